"""Hyperparameters of a Variational Markov Transformer, saved inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

from vmt.config_fields import config_from_dict

PriorKind = Literal["mixture", "flow", "token"]
TransitionKind = Literal["gated", "linear", "flow", "token"]
EmissionKind = Literal["categorical", "bernoulli", "gaussian", "token"]
GuideKind = Literal["gaussian", "full", "flow", "token", "affine"]


@dataclass(frozen=True)
class VMTConfig:
    """Every size and choice that fixes the shapes of a VMT's parameters.

    Attributes:
        state_dim: dimension ``D`` of the latent state ``x_k``.
        obs_dim: vocabulary size (categorical emission) or observation dimension
            (Bernoulli / Gaussian emissions).
        feature_dim: dimension of the guide's input features ``h_k`` (the reader's output).
        emission: ``"categorical"`` (softmax over a vocabulary), ``"bernoulli"`` (piano
            rolls) or ``"gaussian"`` (continuous data).
        emission_hidden: hidden width of the emission MLP; 0 makes it linear.
        prior: ``"mixture"`` of ``prior_components`` diagonal Gaussians, or ``"flow"``.
        transition: ``"gated"`` (deep-Markov-model gated MLP Gaussian), ``"linear"``
            (linear-Gaussian, for exact oracles) or ``"flow"`` (gated Gaussian followed by a
            conditional affine-coupling flow).
        transition_hidden: hidden width of the transition networks.
        guide: ``"gaussian"`` (diagonal, gated combiner), ``"full"`` (a full-covariance
            Gaussian step: a lower-triangular scale whose off-diagonal part the combiner
            outputs, so the guide can represent correlations between state dimensions given
            the previous state), ``"flow"`` (diagonal Gaussian followed by a conditional flow)
            or ``"affine"`` (Gaussian with a mean affine in the previous state, sampled by a
            parallel scan: :mod:`vmt.models.scan`).
        affine_structure: the affine guide's matrix and noise: ``"diagonal"`` (elementwise
            scan) or ``"full"`` (a ``state x state`` matrix and a full covariance; contains
            the exact posterior of a linear-Gaussian model, costs ``O(state^3)`` per position).
        guide_hidden: hidden width of the guide's combiner.
        max_window: the largest number of tokens ahead ``T`` the guide is told about; used
            to scale its time inputs.
        max_skip: the largest skip ``t`` the skip guide is trained for.
        flow_layers: coupling layers in every flow.
        reverse: also build the reverse transition ``p_r(x_{k-1} | x_k)``.
        min_scale: floor added to every Gaussian scale, for numerical safety.
        token_dim: dimension ``E`` of the token slot of the token family (prior, transition,
            emission and guide all ``"token"``, see :mod:`vmt.models.tokens`): the state is
            ``[memory (state_dim - E), slot (E)]``. Unused by the other families.
        slot_scale: the token slot's noise ``s`` in the token family.
        memory_scale: initial scale of the token family's memory step.
        memory_guide: how the token family's guide proposes the memory: ``"model"`` uses the
            model's own memory step (features then enter only through the first state),
            ``"features"`` shifts and rescales it by the features read at each position.
        first_guide: how the token family's guide proposes the first memory of a fresh start:
            ``"features"`` from the reader's features of the window ahead, ``"fixed"`` a
            learned Gaussian that reads nothing. With ``"fixed"`` (and ``memory_guide="model"``)
            the memory holds only what the model's own steps wrote from tokens already read,
            nothing of the window ahead (the reader is then still built and run, but unused).
        token_basis_dim: ``F > 0`` gives the token family fixed token vectors (e.g. a
            pretrained LM's input embeddings, ``vocab x F``) through which embeddings and the
            next-token head are parameterised (:class:`vmt.models.tokens.TokenMixture`).
        head_dropout: dropout on the memory as the token family's next-token head reads it,
            in training only (a regulariser of the head; one mask per sampled state, shared
            by every term that scores it).
    """

    state_dim: int = 32
    obs_dim: int = 1000
    feature_dim: int = 64
    emission: EmissionKind = "categorical"
    emission_hidden: int = 0
    prior: PriorKind = "mixture"
    prior_components: int = 4
    transition: TransitionKind = "gated"
    transition_hidden: int = 64
    guide: GuideKind = "gaussian"
    guide_hidden: int = 64
    affine_structure: Literal["diagonal", "full"] = "diagonal"
    max_window: int = 1024
    max_skip: int = 16
    flow_layers: int = 2
    reverse: bool = False
    min_scale: float = 1e-3
    token_dim: int = 0
    slot_scale: float = 0.1
    memory_scale: float = 0.05
    memory_guide: Literal["model", "features"] = "model"
    first_guide: Literal["features", "fixed"] = "features"
    token_basis_dim: int = 0
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("state_dim", "obs_dim", "feature_dim", "prior_components",
                     "transition_hidden", "guide_hidden", "max_window", "max_skip"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.emission_hidden < 0 or self.flow_layers < 0:
            raise ValueError("emission_hidden and flow_layers must be >= 0")
        choices = {
            "emission": ("categorical", "bernoulli", "gaussian", "token"),
            "prior": ("mixture", "flow", "token"),
            "transition": ("gated", "linear", "flow", "token"),
            "guide": ("gaussian", "full", "flow", "token", "affine"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        token_parts = [name for name in choices if getattr(self, name) == "token"]
        if token_parts and len(token_parts) != len(choices):
            raise ValueError(
                f"the token family needs prior, transition, emission and guide all 'token'; "
                f"got 'token' only for {token_parts}"
            )
        if token_parts and not 1 <= self.token_dim < self.state_dim:
            raise ValueError(
                f"the token family needs 1 <= token_dim < state_dim, got token_dim="
                f"{self.token_dim}, state_dim={self.state_dim}"
            )
        if not isinstance(self.token_basis_dim, int) or self.token_basis_dim < 0:
            raise ValueError(f"token_basis_dim must be an integer >= 0, got {self.token_basis_dim!r}")
        if isinstance(self.head_dropout, bool) or not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must lie in [0, 1), got {self.head_dropout!r}")
        if self.affine_structure not in ("diagonal", "full"):
            raise ValueError(
                f"affine_structure must be 'diagonal' or 'full', got {self.affine_structure!r}"
            )
        if self.memory_guide not in ("model", "features"):
            raise ValueError(f"memory_guide must be 'model' or 'features', got {self.memory_guide!r}")
        if self.first_guide not in ("features", "fixed"):
            raise ValueError(f"first_guide must be 'features' or 'fixed', got {self.first_guide!r}")
        if not (self.slot_scale > 0 and self.memory_scale > 0):
            raise ValueError(
                f"slot_scale and memory_scale must be > 0, got {self.slot_scale}, {self.memory_scale}"
            )
        if (self.prior == "flow" or self.transition == "flow" or self.guide == "flow") and (
            self.state_dim < 2
        ):
            raise ValueError("flows need state_dim >= 2")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {self.min_scale}")

    @property
    def emits_tokens(self) -> bool:
        """Whether observations are token ids (a categorical or token-family emission)."""
        return self.emission in ("categorical", "token")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VMTConfig:
        """The config of a JSON object; unknown keys are a ``ValueError`` naming them."""
        return config_from_dict(cls, data, "VMTConfig")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
