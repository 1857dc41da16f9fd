"""The token-mixture family: an HMM whose state holds the token it emits.

The state splits as ``x = [m, u]``: a memory ``m`` (``state - token`` dims) and a token slot
``u`` (``token`` dims). With a table of token embeddings ``e_v`` (``vocab x token``), a
next-token head ``pi(m) = softmax(W m + b)`` and a slot noise ``s``::

    m_{k+1} ~ N(g(m_k, u_k), diag(sigma(m_k, u_k)^2))       memory step (a GRU cell mean)
    u_{k+1} ~ sum_v pi_v(m_{k+1}) N(e_v, s^2 I)             token slot: a mixture over tokens
    y_k | x_k ~ Categorical(r(x_k)),  r_v(x) ∝ pi_v(m) N(u; e_v, s^2 I)

The emission ``r`` is the mixture's responsibility: it decodes the component the slot was
drawn from. It follows that ``p(u, y | m) = pi_y(m) N(u; e_y, s^2 I)`` exactly, so
``p(y_k | m_k) = pi_{y_k}(m_k)`` and ``p(u_k | y_k, m_k) = N(e_{y_k}, s^2 I)``: the model is
an autoregressive (RNN) language model with noisy states, written as a hidden Markov model
whose transition and emission see only the state. The first state is drawn from the prior
``m ~ mixture of Gaussians``, ``u | m ~`` the same token mixture.

The guide (:class:`TokenGuideNet`) proposes the slot ``q(u_k) = N(e_{y_k}, s^2 I)`` (the
exact conditional above; it reads the token ``y_k``) and the memory as the model's own step
shifted and rescaled by the features it reads, ``q(m_k | x_{k-1}, h_k) = N(g + Δ(h_k, x),
sigma · exp(ρ(h_k, x)))``, with ``Δ = ρ = 0`` at initialisation (``memory_guide="features"``),
or exactly the model's memory step (``memory_guide="model"``: the features then inform only
the first state of a fresh start; ``first_guide="fixed"`` makes that a learned Gaussian too,
so nothing of the window ahead enters the state). With ``Δ = ρ = 0`` the per-position ELBO term is exactly
``log pi_{y_k}(m_k)``: whatever the slot noise, the slot's KL and reconstruction cancel to the
next-token log-probability, and the bound is that of a noisy recurrent language model.

Measured (``docs/benchmarks.md``, ``text-lm``): shifting the memory by features that read the
token being predicted lets the guide pass that token into the memory at a KL price, and
training then widens the memory noise to make the passage cheap: a worse optimum than the
model's own step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from vmt.models.config import VMTConfig
from vmt.models.guide import feature_context
from vmt.models.prior import MixturePrior
from vmt.models.pyro_module import LocalParamsModule

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


class TokenMixture(LocalParamsModule):
    """The parts the token family shares: embeddings ``e``, next-token head ``pi``, noise ``s``.

    Args:
        memory_dim: ``M``, dimension of the memory part ``m``.
        token_dim: ``E``, dimension of the token slot ``u``.
        vocab_size: ``V``.
        hidden: hidden width of the next-token head; 0 makes it linear.
        slot_scale: the slot noise ``s`` (fixed: the ELBO does not depend on it, the memory's
            view of the token does).
        basis_dim: ``F > 0`` gives every token a fixed vector ``b_v`` (``vocab x F``, a buffer
            filled by :meth:`set_basis`, e.g. a pretrained LM's input embeddings): then
            ``e_v = A b_v`` and ``log pi_v(m) = b_v . P(m) / sqrt(F) + c_v`` with ``A (E x F)``, ``P`` and
            ``c`` learned, so tokens seen rarely still get informed embeddings and logits.
            ``0``: free embeddings and head.
        head_dropout: dropout on ``m`` as the head reads it, in training mode only. Inside
            :meth:`sharing` every term that scores a state sees the same mask.
    """

    def __init__(self, memory_dim: int, token_dim: int, vocab_size: int, hidden: int = 0,
                 slot_scale: float = 0.1, basis_dim: int = 0, head_dropout: float = 0.0):
        super().__init__()
        self.head_dropout = float(head_dropout)
        self.memory_dim, self.token_dim, self.vocab_size = memory_dim, token_dim, vocab_size
        self.basis_dim = basis_dim
        out = basis_dim if basis_dim else vocab_size
        if basis_dim:
            self.register_buffer("basis", torch.randn(vocab_size, basis_dim))
            self.basis_proj = nn.Linear(basis_dim, token_dim, bias=False)
            with torch.no_grad():
                self.basis_proj.weight.mul_(math.sqrt(3))  # unit-variance e_v for standardised b_v
            self.token_bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.embedding = nn.Parameter(torch.randn(vocab_size, token_dim))
        if hidden == 0:
            self.head = nn.Linear(memory_dim, out, bias=not basis_dim)
        else:
            self.head = nn.Sequential(nn.Linear(memory_dim, hidden), nn.Tanh(),
                                      nn.Linear(hidden, out, bias=not basis_dim))
        self.slot_scale = float(slot_scale)
        self._memo: dict | None = None

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """Inside this block the scores of a state tensor (:meth:`scores`) are computed once
        and reused by the prior, the transition, the emission and the predictive: one ELBO
        then does one vocabulary-sized product per position instead of three (and one head
        pass instead of four). Entries are keyed by the tensor object itself (kept alive by
        the memo), the grad mode and the parameters' versions, and dropped on exit."""
        outer = self._memo
        self._memo = {} if outer is None else outer
        try:
            yield
        finally:
            self._memo = outer

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``head`` = ``log pi(m)``, ``joint`` = :meth:`joint_logits` and ``slot`` =
        ``logsumexp(joint)`` of states ``x (..., state)``: ``(..., vocab)``, ``(..., vocab)``,
        ``(...)``; memoised inside :meth:`sharing`."""
        key = None
        if self._memo is not None:
            key = (id(x), torch.is_grad_enabled(), tuple(p._version for p in self.parameters()))
            hit = self._memo.get(key)
            if hit is not None and hit[0] is x:
                return hit[1]
        m, u = self.split(x)
        head = self.head_log_probs(m)
        joint = head + self._slot_log_density(u)
        out = {"head": head, "joint": joint, "slot": torch.logsumexp(joint, dim=-1)}
        if key is not None:
            self._memo[key] = (x, out)
        return out

    @torch.no_grad()
    def set_basis(self, basis: torch.Tensor) -> None:
        """Fill the fixed token vectors ``(vocab, F)``; each column is standardised."""
        if not self.basis_dim:
            raise ValueError("this token mixture has no basis (basis_dim=0)")
        if tuple(basis.shape) != tuple(self.basis.shape):
            raise ValueError(f"basis must be {tuple(self.basis.shape)} (vocab, basis_dim), got {tuple(basis.shape)}")
        basis = basis.to(self.basis.dtype)
        self.basis.copy_((basis - basis.mean(0)) / basis.std(0).clamp(min=1e-6))

    def table(self) -> torch.Tensor:
        """The token embeddings ``e``: ``(vocab, E)``."""
        if self.basis_dim:
            return self.basis_proj(self.basis)
        return self.embedding

    def head_logits(self, m: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``log pi(m)``: ``(..., M) -> (..., vocab)``."""
        m = F.dropout(m, self.head_dropout, training=self.training and self.head_dropout > 0)
        if self.basis_dim:
            scaled = self.head(m) / math.sqrt(self.basis_dim)  # logits of unit scale at init
            return scaled @ self.basis.to(m.dtype).T + self.token_bias
        return self.head(m)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., state) -> (m (..., M), u (..., E))``."""
        if x.shape[-1] != self.memory_dim + self.token_dim:
            raise ValueError(
                f"token-family states have {self.memory_dim + self.token_dim} dims "
                f"(memory {self.memory_dim} + slot {self.token_dim}), got {tuple(x.shape)}"
            )
        return x[..., : self.memory_dim], x[..., self.memory_dim :]

    def head_log_probs(self, m: torch.Tensor) -> torch.Tensor:
        """``log pi(m)``: ``(..., M) -> (..., vocab)``."""
        return torch.log_softmax(self.head_logits(m), dim=-1)

    def _slot_log_density(self, u: torch.Tensor) -> torch.Tensor:
        """``log N(u; e_v, s^2 I)`` for every token ``v``: ``(..., E) -> (..., vocab)``."""
        s2 = self.slot_scale**2
        e = self.table().to(u.dtype)
        sq = (u * u).sum(-1, keepdim=True) - 2 * u @ e.T + (e * e).sum(-1)  # (..., vocab)
        return -0.5 * sq / s2 - 0.5 * self.token_dim * math.log(2 * math.pi * s2)

    def joint_logits(self, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``log pi_v(m) + log N(u; e_v, s^2 I)`` for every token ``v``: ``(..., vocab)``."""
        return self.head_log_probs(m) + self._slot_log_density(u)

    def slot_log_prob(self, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``log sum_v pi_v(m) N(u; e_v, s^2 I)``: ``(...)``."""
        return torch.logsumexp(self.joint_logits(m, u), dim=-1)

    def sample_slot(self, m: torch.Tensor) -> torch.Tensor:
        """``u ~ sum_v pi_v(m) N(e_v, s^2 I)``: ``(..., M) -> (..., E)``."""
        v = dist.Categorical(logits=self.head_logits(m)).sample()
        e = self.table()[v].to(m.dtype)
        return e + self.slot_scale * torch.randn_like(e)

    def token_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """``e_y``: tokens ``(...)`` int64 (negative = padding, read as 0) -> ``(..., E)``."""
        return self.table()[y.clamp(min=0)]


class _Shared:
    """Holds a module without registering it as a child (the VMT owns it once)."""

    def __init__(self, module: nn.Module):
        self.module = module


class _TokenStep(TorchDistribution):
    """``p(x' | x)`` of the token family at states ``(..., state)``; event ``(state,)``."""

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, mixture: TokenMixture, loc: torch.Tensor, scale: torch.Tensor):
        self.mixture, self.loc, self.scale = mixture, loc, scale
        batch = loc.shape[:-1]
        super().__init__(batch, torch.Size([mixture.memory_dim + mixture.token_dim]),
                         validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        m, _ = self.mixture.split(value)
        memory = dist.Normal(self.loc, self.scale).log_prob(m).sum(-1)
        return memory + self.mixture.scores(value)["slot"]

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.loc.shape
            m = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device)
            return torch.cat([m, self.mixture.sample_slot(m)], dim=-1)


class TokenTransition(LocalParamsModule):
    """``p(x_{k+1} | x_k)``: a GRU-cell memory step, then the token-slot mixture.

    ``memory_params(x) -> (loc, scale)``, each ``(..., M)``: the memory step's Gaussian.
    """

    def __init__(self, mixture: TokenMixture, min_scale: float = 1e-3, init_scale: float = 0.05):
        super().__init__()
        self._shared = _Shared(mixture)
        self.cell = nn.GRUCell(mixture.token_dim, mixture.memory_dim)
        self.to_scale = nn.Linear(mixture.memory_dim, mixture.memory_dim)
        self.min_scale = min_scale
        with torch.no_grad():
            self.to_scale.weight.zero_()
            self.to_scale.bias.fill_(math.log(math.expm1(init_scale)))

    @property
    def mixture(self) -> TokenMixture:
        return self._shared.module

    def memory_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, u = self.mixture.split(x)
        lead = m.shape[:-1]
        loc = self.cell(u.reshape(-1, u.shape[-1]), m.reshape(-1, m.shape[-1])).view(*lead, -1)
        scale = F.softplus(self.to_scale(loc)) + self.min_scale
        return loc, scale

    def distribution(self, x: torch.Tensor) -> TorchDistribution:
        return _TokenStep(self.mixture, *self.memory_params(x))


class _TokenPriorDistribution(TorchDistribution):
    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, mixture: TokenMixture, memory: dist.TorchDistribution):
        self.mixture, self.memory = mixture, memory
        super().__init__(torch.Size(), torch.Size([mixture.memory_dim + mixture.token_dim]),
                         validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        m, _ = self.mixture.split(value)
        return self.memory.log_prob(m) + self.mixture.scores(value)["slot"]

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            m = self.memory.sample(sample_shape)
            return torch.cat([m, self.mixture.sample_slot(m)], dim=-1)


class TokenPrior(LocalParamsModule):
    """``p(x)``: a Gaussian-mixture memory, then the token-slot mixture."""

    def __init__(self, mixture: TokenMixture, components: int):
        super().__init__()
        self._shared = _Shared(mixture)
        self.memory = MixturePrior(mixture.memory_dim, components)

    def distribution(self) -> TorchDistribution:
        return _TokenPriorDistribution(self._shared.module, self.memory.distribution())


class TokenEmission(LocalParamsModule):
    """``p(y | x)``: the responsibility of each token's component for the slot ``u``."""

    def __init__(self, mixture: TokenMixture):
        super().__init__()
        self._shared = _Shared(mixture)
        self.vocab_size = mixture.vocab_size

    @property
    def obs_shape(self) -> tuple[int, ...]:
        """Shape of one observation: ``()`` (a token id)."""
        return ()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., state) -> (..., vocab)`` unnormalised log-probabilities."""
        return self._shared.module.scores(x)["joint"]

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=self.logits(x))

    def predictive_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(y_k = v | m_k) = log pi_v(m_k)``: the next-token distribution before the slot
        is read, ``(..., state) -> (..., vocab)`` (what distillation compares with an LM)."""
        return self._shared.module.scores(x)["head"]

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x = [m, u]`` with the slot redrawn from ``p(u | y, m) = N(e_y, s^2 I)``: states
        ``(..., state)``, tokens ``(...)`` -> ``(..., state)``."""
        mixture = self._shared.module
        m, _ = mixture.split(x)
        e = mixture.token_embedding(y).to(x.dtype).expand(*m.shape[:-1], -1)
        return torch.cat([m, e + mixture.slot_scale * torch.randn_like(e)], dim=-1)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p(y | x)``: states ``(..., state)``, tokens ``(...)`` -> ``(...)``."""
        scores = self._shared.module.scores(x)
        picked = scores["joint"].gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked - scores["slot"]


class TokenGuideNet(LocalParamsModule):
    """Guide of the token family: the slot from the token read, the memory from the model's
    own step corrected by the features.

    The context is ``(batch, time, hidden + token)``: the feature part (as in
    :class:`~vmt.models.guide.GuideNet`) followed by the embedding of the token at each
    position. ``first_params`` / ``step_params`` return ``(loc, scale, combined)`` like the
    Gaussian guide (``combined`` is the ``(..., hidden)`` combiner output).
    """

    reads_tokens = True

    def __init__(self, config: VMTConfig, mixture: TokenMixture, transition: TokenTransition):
        super().__init__()
        d, f, h = config.state_dim, config.feature_dim, config.guide_hidden
        mem = mixture.memory_dim
        self.config = config
        self._shared = _Shared(mixture)
        self._transition = _Shared(transition)
        self.feature_proj = nn.Linear(f, h)
        self.ahead_proj = nn.Linear(1, h, bias=False)
        self.skip_proj = nn.Linear(1, h, bias=False)
        self.first_head = nn.Linear(h, 2 * mem)
        self.state_proj = nn.Linear(d, h)
        self.step_head = nn.Linear(h, 2 * mem)
        with torch.no_grad():  # start as the model's own memory step
            self.step_head.weight.zero_()
            self.step_head.bias.zero_()
        self.shifts = config.memory_guide == "features"
        self.reads_first = config.first_guide == "features"
        self.hidden = h
        self.min_scale = config.min_scale
        self.flows = nn.ModuleList()

    @property
    def mixture(self) -> TokenMixture:
        return self._shared.module

    def context(self, features: torch.Tensor, ahead: torch.Tensor,
                source: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        """``features (source, time, feature)``, ``ahead (batch, time)``, ``tokens (batch,
        time)`` -> ``(batch, time, hidden + token)``."""
        if tokens is None:
            raise ValueError("the token-family guide reads the tokens: pass tokens (batch, time)")
        projected = feature_context(self, features, ahead, source)
        emb = self.mixture.token_embedding(tokens[:, : ahead.shape[1]]).to(projected.dtype)
        return torch.cat([projected, emb], dim=-1)

    def skip_context(self, context: torch.Tensor, skip: torch.Tensor | int) -> torch.Tensor:
        """``tanh(features + e(t))`` on the feature part; the token part passes through."""
        feats, emb = context[..., : self.hidden], context[..., self.hidden :]
        skip = torch.as_tensor(skip, dtype=context.dtype, device=context.device)
        s = torch.log(skip) / math.log(max(self.config.max_skip, 2))
        feats = torch.tanh(feats + self.skip_proj(s.expand(feats.shape[:-1]).unsqueeze(-1)))
        return torch.cat([feats, emb], dim=-1)

    def with_target(self, skip_context: torch.Tensor, target_context: torch.Tensor) -> torch.Tensor:
        """``skip_context`` with its token part taken from the target position's context."""
        return torch.cat([skip_context[..., : self.hidden], target_context[..., self.hidden :]], -1)

    def _slot(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return emb, torch.full_like(emb, self.mixture.slot_scale)

    def first_params(self, context: torch.Tensor):
        """``q(x_1 | h_1, y_1)`` from ``context (..., hidden + token)`` (``first_guide="fixed"``:
        ``q(m_1)`` does not read ``h_1``)."""
        feats = context[..., : self.hidden]
        combined = torch.tanh(feats) if self.reads_first else torch.zeros_like(feats)
        loc, raw = self.first_head(combined).chunk(2, dim=-1)
        slot_loc, slot_scale = self._slot(context[..., self.hidden :])
        scale = F.softplus(raw) + self.min_scale
        return torch.cat([loc, slot_loc], -1), torch.cat([scale, slot_scale], -1), combined

    def step_params(self, x_prev: torch.Tensor, skip_context: torch.Tensor, skip: int = 1):
        """``q(x_{k+t} | x_k, h, y_{k+t})``: the model's memory step, shifted and rescaled.

        For a skip ``t > 1`` the model's one-step memory is only a starting point the shift
        corrects, so it is detached: the skip guide's loss trains the guide, not the model.
        """
        feats = skip_context[..., : self.hidden]
        combined = 0.5 * (torch.tanh(self.state_proj(x_prev)) + feats)
        base_loc, scale = self._transition.module.memory_params(x_prev)
        if skip > 1:
            base_loc, scale = base_loc.detach(), scale.detach()
        if self.shifts or skip > 1:  # the skip guide always corrects the one-step memory
            shift, log_ratio = self.step_head(combined).chunk(2, dim=-1)
            base_loc = base_loc + shift
            scale = scale * torch.exp(log_ratio.clamp(max=5.0))
        slot_loc, slot_scale = self._slot(skip_context[..., self.hidden :])
        return (torch.cat([base_loc, slot_loc], -1), torch.cat([scale, slot_scale], -1), combined)

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor, combined: torch.Tensor):
        """A diagonal Gaussian over the state, event ``(state,)``."""
        return dist.Normal(loc, scale).to_event(1)

    def flow_transforms(self, combined: torch.Tensor) -> list:
        return []


def sharing_scores(vmt: VariationalMarkovTransformer):
    """:meth:`TokenMixture.sharing` of a token-family VMT; a no-op context for other families."""
    tokens = getattr(vmt, "tokens", None)
    return tokens.sharing() if tokens is not None else nullcontext()
