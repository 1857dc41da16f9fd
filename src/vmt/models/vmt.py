"""The Variational Markov Transformer: generative model and guide as one ``PyroModule``.

Generative model (shared by every position and every subsequence)::

    x_start ~ p(x)                      prior (mixture of Gaussians or a flow)
    x_{k+1} ~ p(x_{k+1} | x_k)          transition (gated Gaussian, linear, or flow)
    y_k     ~ p(y_k | x_k)              emission (categorical, Bernoulli, Gaussian)

Guide, reading features ``h_k`` that summarise ``y_k .. y_n`` (a reversed reading)::

    x_start ~ q(x_1 | h_1, T)
    x_{k+t} ~ q(x_{k+t} | x_k, h_{k+1}, t, T)     (t = 1 in the ELBO; t > 1 is the skip guide)

With ``config.reverse`` the module also holds the reverse transition ``p_r(x_{k-1} | x_k)``
and its guide ``q_r``, which read features of the *forward* LM; calling :meth:`model` and
:meth:`guide` with ``direction="reverse"`` on time-reversed batches trains or scores the
reverse VMT with the shared prior and emission.
"""

from __future__ import annotations

from typing import Literal

import pyro
import torch
from pyro import poutine
from torch import nn

from vmt.models.batch import ChainBatch
from vmt.models.chain import ChainPrior, GuideChain, SequenceEmission
from vmt.models.config import VMTConfig
from vmt.models.emission import build_emission
from vmt.models.guide import GuideNet
from vmt.models.prior import build_prior
from vmt.models.pyro_module import LocalParamsModule
from vmt.models.scan import AffineGuideNet
from vmt.models.tokens import (
    TokenEmission,
    TokenGuideNet,
    TokenMixture,
    TokenPrior,
    TokenTransition,
)
from vmt.models.transition import build_transition

Direction = Literal["forward", "reverse"]


class VariationalMarkovTransformer(LocalParamsModule):
    """A VMT.

    Args:
        config: sizes and choices (:class:`~vmt.models.config.VMTConfig`).
        reader: optional trainable module mapping ``(reader_input, reader_lengths)`` to
            ``(source, time, feature)`` guide features (e.g. a GRU reverse reader). Without it,
            batches must carry precomputed ``features`` (e.g. from a frozen-LM cache).
        reader_spec: alternatively, a JSON spec of the reader
            (:func:`vmt.models.reader_spec.build_reader`); it is saved in checkpoints, so a
            model with a spec'd reader can be rebuilt from its checkpoint alone.
    """

    def __init__(
        self, config: VMTConfig, reader: nn.Module | None = None, reader_spec: dict | None = None
    ):
        super().__init__()
        if reader is None and reader_spec is not None:
            from vmt.models.reader_spec import build_reader

            reader = build_reader(reader_spec)
        self.reader_spec = reader_spec
        c = config
        self.config = c
        self.reader = reader
        if c.transition == "token":
            self._build_token_family(c)
            return
        self.prior = build_prior(c.prior, c.state_dim, c.prior_components, c.flow_layers, c.transition_hidden)
        self.transition = build_transition(
            c.transition, c.state_dim, c.transition_hidden, c.flow_layers, c.min_scale
        )
        self.emission = build_emission(c.emission, c.state_dim, c.obs_dim, c.emission_hidden)
        guide_cls = AffineGuideNet if c.guide == "affine" else GuideNet
        self.guide_net = guide_cls(c)
        if c.reverse:
            self.reverse_transition = build_transition(
                c.transition, c.state_dim, c.transition_hidden, c.flow_layers, c.min_scale
            )
            self.reverse_guide_net = guide_cls(c)

    def _build_token_family(self, c: VMTConfig) -> None:
        """Prior, transitions, emission and guides sharing one :class:`TokenMixture`."""
        self.tokens = TokenMixture(c.state_dim - c.token_dim, c.token_dim, c.obs_dim,
                                   c.emission_hidden, c.slot_scale, c.token_basis_dim, c.head_dropout)
        self.prior = TokenPrior(self.tokens, c.prior_components)
        self.transition = TokenTransition(self.tokens, c.min_scale, c.memory_scale)
        self.emission = TokenEmission(self.tokens)
        self.guide_net = TokenGuideNet(c, self.tokens, self.transition)
        if c.reverse:
            self.reverse_transition = TokenTransition(self.tokens, c.min_scale, c.memory_scale)
            self.reverse_guide_net = TokenGuideNet(c, self.tokens, self.reverse_transition)

    # -- parts by direction -------------------------------------------------------------
    def transition_for(self, direction: Direction = "forward"):
        if direction == "forward":
            return self.transition
        self._require_reverse()
        return self.reverse_transition

    def guide_net_for(self, direction: Direction = "forward") -> GuideNet:
        if direction == "forward":
            return self.guide_net
        self._require_reverse()
        return self.reverse_guide_net

    def _require_reverse(self) -> None:
        if not self.config.reverse:
            raise ValueError("this VMT has no reverse parts; build it with VMTConfig(reverse=True)")

    # -- guide inputs ----------------------------------------------------------------------
    def guide_features(self, batch: ChainBatch) -> torch.Tensor:
        """``(source, time, feature)`` features the guide reads."""
        if self.reader is not None and batch.reader_input is not None:
            lengths = batch.reader_lengths
            if lengths is None:
                raise ValueError("reader_input needs reader_lengths")
            return self.reader(batch.reader_input, lengths)
        if batch.features is None:
            raise ValueError("the batch has no features and the model has no reader to compute them")
        return batch.features

    def guide_context(self, batch: ChainBatch, direction: Direction = "forward") -> torch.Tensor:
        """``(batch, time, hidden)``: everything the guide needs that does not depend on ``x``."""
        net = self.guide_net_for(direction)
        if net.reads_tokens:
            return net.context(self.guide_features(batch), batch.ahead(), batch.source,
                               tokens=batch.obs)
        return net.context(self.guide_features(batch), batch.ahead(), batch.source)

    # -- Pyro model and guide --------------------------------------------------------------
    def model(self, batch: ChainBatch, annealing: float = 1.0, direction: Direction = "forward"):
        """Generative model: one site ``x`` for every state path, one site ``y`` for the data."""
        with pyro.plate("chains", batch.num_rows):
            with poutine.scale(scale=annealing):
                x = pyro.sample(
                    "x",
                    ChainPrior(self.prior, self.transition_for(direction), batch, self.config.state_dim),
                )
            pyro.sample("y", SequenceEmission(self.emission, x, batch), obs=batch.obs)
        return x

    def guide(self, batch: ChainBatch, annealing: float = 1.0, direction: Direction = "forward"):
        """Variational posterior: one site ``x`` sampled step by step, scored in one pass."""
        context = self.guide_context(batch, direction)
        with pyro.plate("chains", batch.num_rows):
            with poutine.scale(scale=annealing):
                return pyro.sample("x", GuideChain(self.guide_net_for(direction), context, batch))

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def token_rnn_vmt(vocab: int, memory_dim: int, token_dim: int, hidden: int, max_window: int,
                  embed_dim: int = 32) -> VariationalMarkovTransformer:
    """A small token-family VMT over ``vocab`` token ids with a GRU reader of the tokens.

    Its guide's memory step is the model's own (``memory_guide="model"``), so the reader only
    informs the first state of a fresh read: a noisy recurrent language model whose state,
    ``memory_dim + token_dim`` numbers, is all it carries from one window to the next. Slot
    noise 0.1 and scale floor 1e-3 keep the memory's view of each token sharp.
    """
    config = VMTConfig(state_dim=memory_dim + token_dim, token_dim=token_dim, obs_dim=vocab,
                       feature_dim=hidden, guide_hidden=hidden, prior="token", transition="token",
                       emission="token", guide="token", memory_guide="model", slot_scale=0.1,
                       min_scale=1e-3, max_window=max_window)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": hidden, "vocab_size": vocab,
                                       "embed_dim": embed_dim}}
    return VariationalMarkovTransformer(config, reader_spec=spec)
