"""Emissions ``p(y_k | x_k)``: categorical (a GPT-like softmax), Bernoulli, Gaussian.

``distribution(x)`` maps states ``(..., state)`` to a distribution over one observation with
batch shape ``(...)``: event shape ``()`` for tokens, ``(obs,)`` for vectors.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import constraints

from vmt.models.parts import check_observations, check_states
from vmt.models.pyro_module import LocalParamsModule


def _mlp(state_dim: int, hidden: int, out: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(state_dim, out)
    return nn.Sequential(
        nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, out),
    )


class CategoricalEmission(LocalParamsModule):
    """Softmax over a vocabulary of ``vocab`` tokens, like a GPT's final layer."""

    def __init__(self, state_dim: int, vocab_size: int, hidden: int = 0):
        super().__init__()
        self.state_dim = state_dim
        self.vocab_size = vocab_size
        self.net = _mlp(state_dim, hidden, vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., state) -> (..., vocab) unnormalised log-probabilities."""
        check_states(x, self.state_dim, "the categorical emission")
        return self.net(x)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=self.logits(x))

    @property
    def obs_shape(self) -> tuple[int, ...]:
        """Shape of one observation: a token id."""
        return ()

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x) for states (..., state) and tokens (...) int64 -> (...) (broadcast)."""
        check_observations(y, (), "the categorical emission")
        logp = torch.log_softmax(self.logits(x), dim=-1)
        shape = torch.broadcast_shapes(logp.shape[:-1], y.shape)
        if shape != logp.shape[:-1]:
            logp = logp.expand(*shape, logp.shape[-1])
        return logp.gather(-1, y.clamp(min=0).expand(shape).unsqueeze(-1)).squeeze(-1)

    def init_from_lm_head(self, weight: torch.Tensor, freeze: bool = False) -> None:
        """Copy a pretrained LM head ``(vocab, state)`` into a linear emission.

        Needs ``state_dim`` equal to the LM's hidden size and a linear emission
        (``emission_hidden=0``). With ``freeze`` the weight is tied: it is not trained.
        """
        if not isinstance(self.net, nn.Linear):
            raise ValueError("only a linear emission (emission_hidden=0) can take the LM head")
        if tuple(weight.shape) != tuple(self.net.weight.shape):
            raise ValueError(
                f"LM head has shape {tuple(weight.shape)} but the emission needs "
                f"(vocab, state) = {tuple(self.net.weight.shape)}"
            )
        with torch.no_grad():
            self.net.weight.copy_(weight)
            self.net.bias.zero_()
        self.net.weight.requires_grad_(not freeze)


class BernoulliEmission(LocalParamsModule):
    """Independent Bernoulli per observation dimension (e.g. the 88 keys of a piano roll)."""

    def __init__(self, state_dim: int, obs_dim: int, hidden: int = 0):
        super().__init__()
        self.obs_shape = (obs_dim,)
        self.state_dim = state_dim
        self.net = _mlp(state_dim, hidden, obs_dim)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``p(y | x)`` for ``x (..., state)``: batch shape ``(...)``, event ``(obs,)``."""
        check_states(x, self.state_dim, "the bernoulli emission")
        return dist.Bernoulli(logits=self.net(x)).to_event(1)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x) for states (..., state) and observations (..., obs) -> (...)."""
        check_observations(y, self.obs_shape, "the bernoulli emission")
        return self.distribution(x).log_prob(y)


class GaussianEmission(LocalParamsModule):
    """``y = f(x) + eps``, ``eps ~ N(0, diag(scale^2))``; ``f`` linear when ``hidden=0``."""

    def __init__(self, state_dim: int, obs_dim: int, hidden: int = 0):
        super().__init__()
        self.obs_shape = (obs_dim,)
        self.state_dim = state_dim
        self.net = _mlp(state_dim, hidden, obs_dim)
        self.scale = PyroParam(torch.ones(obs_dim), constraint=constraints.positive)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``p(y | x)`` for ``x (..., state)``: batch shape ``(...)``, event ``(obs,)``."""
        check_states(x, self.state_dim, "the gaussian emission")
        loc = self.net(x)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(1)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x) for states (..., state) and observations (..., obs) -> (...)."""
        check_observations(y, self.obs_shape, "the gaussian emission")
        return self.distribution(x).log_prob(y)


def build_emission(kind: str, state_dim: int, obs_dim: int, hidden: int):
    """The emission ``kind`` names: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``
    (``ValueError`` otherwise)."""
    if kind == "categorical":
        return CategoricalEmission(state_dim, obs_dim, hidden)
    if kind == "bernoulli":
        return BernoulliEmission(state_dim, obs_dim, hidden)
    if kind == "gaussian":
        return GaussianEmission(state_dim, obs_dim, hidden)
    raise ValueError(f"unknown emission kind {kind!r}; known: ['bernoulli', 'categorical', 'gaussian']")
