"""What a part of a VMT must provide: ``typing.Protocol``s for prior, transition, emission
and reader.

Code that needs a capability checks for the protocol (``isinstance(t, GaussianTransition)``)
instead of probing attribute names; every part in :mod:`vmt.models` satisfies its protocol
(``tests/models/test_parts.py``). Shapes: ``x (..., state)``, observations ``(...)`` token ids
or ``(..., obs)``, reader inputs right-padded ``(batch, time)`` or ``(batch, time, obs)``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.distributions import Distribution

__all__ = ["Emission", "GaussianTransition", "Prior", "Reader", "Transition", "check_observations", "check_states"]


@runtime_checkable
class Prior(Protocol):
    """``p(x_1)``."""

    def distribution(self) -> Distribution:
        """The prior, event shape ``(state,)``."""
        ...


@runtime_checkable
class Transition(Protocol):
    """``p(x_{k+1} | x_k)`` (and, with the same classes, reverse transitions)."""

    def distribution(self, x: torch.Tensor) -> Distribution:
        """From ``x (..., state)``: batch shape ``(...)``, event shape ``(state,)``."""
        ...


@runtime_checkable
class GaussianTransition(Transition, Protocol):
    """A transition that is a diagonal Gaussian, whose moments code can use directly."""

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., state)``, of ``p(x_{k+1} | x_k = x)``."""
        ...


@runtime_checkable
class Emission(Protocol):
    """``p(y_k | x_k)``."""

    def distribution(self, x: torch.Tensor) -> Distribution:
        """From ``x (..., state)``: batch shape ``(...)``."""
        ...

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p(y | x)``: ``(...)`` for ``x (..., state)`` and ``y`` ``(...)`` or ``(..., obs)``."""
        ...


@runtime_checkable
class NextTokenEmission(Emission, Protocol):
    """An emission that also gives the next-token predictive of a state (the token family):
    what distillation from a language model compares."""

    def predictive_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., vocab)`` log-probabilities of the token of ``x (..., state)`` given only the
        part of ``x`` that does not depend on it (the token family's memory)."""
        ...

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Draws of the state given its token: ``x (..., state)`` with the token-dependent part
        redrawn from its conditional given ``y (...)`` and the rest of ``x``."""
        ...


@runtime_checkable
class GuideStep(Protocol):
    """The guide's network, one state at a time: parameters of the first state and of a step,
    and the distribution they define (:class:`vmt.models.guide.GuideNet`, the token family's
    and the affine guide's nets). ``reads_tokens``: the context also embeds the token at each
    position (:meth:`context` takes ``tokens=``), as the token family's guide does."""

    reads_tokens: bool

    def first_params(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def step_params(self, x_prev: torch.Tensor, skip_context: torch.Tensor,
                    skip: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor, combined: torch.Tensor) -> Distribution:
        """``q(x_k | ...)``, event ``(state,)``."""
        ...


@runtime_checkable
class Reader(Protocol):
    """A trainable reader the guide owns: right-padded inputs and lengths in,
    ``(batch, time, hidden_size)`` features out (zeros at padding)."""

    hidden_size: int

    def __call__(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor: ...


def check_states(x: torch.Tensor, state_dim: int, part: str) -> None:
    """``ValueError`` naming the shape unless ``x`` is ``(..., state_dim)`` states of ``part``."""
    if x.dim() == 0 or x.shape[-1] != state_dim:
        raise ValueError(f"{part} needs states (..., {state_dim}), got {tuple(x.shape)}")


def check_observations(y: torch.Tensor, obs_shape: tuple[int, ...], part: str) -> None:
    """``ValueError`` naming the shape unless ``y`` ends in ``obs_shape`` (``()`` for token ids,
    which must be integers)."""
    if obs_shape == ():
        if y.is_floating_point():
            raise ValueError(f"{part} needs integer token ids (...), got {y.dtype} {tuple(y.shape)}")
        return
    if tuple(y.shape[y.dim() - len(obs_shape):]) != obs_shape or y.dim() < len(obs_shape):
        raise ValueError(f"{part} needs observations (..., {', '.join(map(str, obs_shape))}), got {tuple(y.shape)}")
