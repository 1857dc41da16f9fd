"""Priors ``p(x)`` of a single state: a Gaussian mixture or a normalising flow."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import constraints

from vmt.models.flows import add_couplings, coupling_transforms
from vmt.models.pyro_module import LocalParamsModule


class MixturePrior(LocalParamsModule):
    """Mixture of ``components`` diagonal Gaussians over ``(state,)``; exact log-density."""

    def __init__(self, state_dim: int, components: int = 4, spread: float = 1.0):
        super().__init__()
        self.state_dim = state_dim
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(spread * torch.randn(components, state_dim) / math.sqrt(state_dim))
        self.scale = PyroParam(torch.ones(components, state_dim), constraint=constraints.positive)

    def distribution(self) -> dist.TorchDistribution:
        """The prior, event shape ``(state,)``."""
        mix = dist.Categorical(logits=self.logits)
        comp = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.MixtureSameFamily(mix, comp)


class FlowPrior(LocalParamsModule):
    """Standard normal pushed through affine-coupling layers with permutations."""

    def __init__(self, state_dim: int, layers: int = 2, hidden: int = 64):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a flow prior needs at least one coupling layer, got {layers}")
        self.state_dim = state_dim
        self.register_buffer("origin", torch.zeros(state_dim))
        add_couplings(self, "couplings", (
            T.affine_coupling(state_dim, hidden_dims=[hidden, hidden]) for _ in range(layers)
        ), state_dim)

    def distribution(self) -> dist.TorchDistribution:
        """The prior, event shape ``(state,)``."""
        base = dist.Normal(self.origin, torch.ones_like(self.origin)).to_event(1)
        return dist.TransformedDistribution(base, coupling_transforms(self, self.couplings))


def build_prior(kind: str, state_dim: int, components: int, layers: int, hidden: int):
    """The prior ``kind`` names: ``"mixture"`` or ``"flow"`` (``ValueError`` otherwise)."""
    if kind == "mixture":
        return MixturePrior(state_dim, components)
    if kind == "flow":
        return FlowPrior(state_dim, layers, hidden)
    raise ValueError(f"unknown prior kind {kind!r}; known: ['flow', 'mixture']")
