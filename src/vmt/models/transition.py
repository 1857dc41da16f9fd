"""Transitions ``p(x_{k+1} | x_k)`` (and, with the same classes, reverse transitions).

Every transition maps previous states ``(..., state)`` to a distribution with event shape
``(state,)`` and the same batch shape, so a whole sampled path is scored in one call.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from vmt.models.flows import add_couplings, coupling_transforms
from vmt.models.parts import check_states
from vmt.models.pyro_module import LocalParamsModule


class GatedTransition(LocalParamsModule):
    """Gated MLP Gaussian transition of deep Markov models (Krishnan et al., 2017).

    ``loc = (1 - g) * (A x + b) + g * m(x)``, ``scale = softplus(W relu(m(x)))``, where
    ``g = sigmoid(MLP(x))`` gates between a linear map (initialised to the identity) and a
    nonlinear proposal ``m``.
    """

    def __init__(self, state_dim: int, hidden: int, min_scale: float = 1e-3):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, state_dim))
        self.proposal = nn.Sequential(
            nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, state_dim)
        )
        self.linear = nn.Linear(state_dim, state_dim)
        self.to_scale = nn.Linear(state_dim, state_dim)
        self.min_scale = min_scale
        self.state_dim = state_dim
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(state_dim))
            self.linear.bias.zero_()

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., state)``, of ``p(x_{k+1} | x_k = x)`` for ``x (..., state)``."""
        check_states(x, self.state_dim, "the gated transition")
        gate = torch.sigmoid(self.gate(x))
        proposed = self.proposal(x)
        loc = (1 - gate) * self.linear(x) + gate * proposed
        scale = F.softplus(self.to_scale(F.relu(proposed))) + self.min_scale
        return loc, scale

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)


class LinearGaussianTransition(LocalParamsModule):
    """``x' = A x + b + eps``, ``eps ~ N(0, diag(scale^2))``: a linear-Gaussian state-space step."""

    def __init__(self, state_dim: int, min_scale: float = 1e-3):
        super().__init__()
        self.matrix = nn.Parameter(0.9 * torch.eye(state_dim))
        self.bias = nn.Parameter(torch.zeros(state_dim))
        self.scale = PyroParam(torch.full((state_dim,), 0.5), constraint=constraints.positive)
        self.min_scale = min_scale
        self.state_dim = state_dim

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., state)``, of ``p(x_{k+1} | x_k = x)`` for ``x (..., state)``."""
        check_states(x, self.state_dim, "the linear transition")
        loc = x @ self.matrix.T + self.bias
        return loc, self.scale.expand_as(loc)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)


class FlowTransition(LocalParamsModule):
    """A gated Gaussian step followed by affine couplings conditioned on the previous state."""

    def __init__(self, state_dim: int, hidden: int, layers: int = 2, min_scale: float = 1e-3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a flow transition needs at least one coupling layer, got {layers}")
        self.base = GatedTransition(state_dim, hidden, min_scale)
        add_couplings(self, "couplings", (
            T.conditional_affine_coupling(state_dim, context_dim=state_dim, hidden_dims=[hidden])
            for _ in range(layers)
        ), state_dim)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``p(x_{k+1} | x_k = x)`` for ``x (..., state)``: event shape ``(state,)``."""
        base = self.base.distribution(x)
        return dist.TransformedDistribution(base, coupling_transforms(self, self.couplings, x))


def build_transition(kind: str, state_dim: int, hidden: int, layers: int, min_scale: float):
    """The transition ``kind`` names: ``"gated"``, ``"linear"`` or ``"flow"`` (``ValueError``
    otherwise)."""
    if kind == "gated":
        return GatedTransition(state_dim, hidden, min_scale)
    if kind == "linear":
        return LinearGaussianTransition(state_dim, min_scale)
    if kind == "flow":
        return FlowTransition(state_dim, hidden, layers, min_scale)
    raise ValueError(f"unknown transition kind {kind!r}; known: ['flow', 'gated', 'linear']")
