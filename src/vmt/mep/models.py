"""MEP, GMEP and SMEP next-token models: log-linear far-pair corrections of a frozen base.

MEP (window base ``q``, far distances ``D``, all ``d`` beyond the base window):

    p*(x_n = b | past) ∝ q(b | last T tokens) · exp(Σ_{d ∈ D} λ_d(x_{n−d}, b)).

This is the maximum-entropy (minimum-KL to ``q``) conditional model whose expected far-pair
counts match the data; its convex dual is the mean negative log-likelihood of the corrected
model, which :func:`vmt.mep.solvers.fit_conditional` minimises. A Gaussian prior on λ of
variance ``prior_variance`` per token gives the penalty ``||λ||² / (2 · prior_variance · N)``
on the mean NLL over ``N`` fitting tokens, so regularisation fades as data grow.

GMEP (:func:`gmep_model`): a uniform base with a unigram bias and couplings at every distance
``1..order`` — a pairwise next-token model. SMEP (:class:`SMEPModel`): one set of couplings
``J_d(a, b)`` shared by a forward model (``J_d(x_{n−d}, x_n)``) and a backward model
(``J_d(x_n, x_{n+d})``), fitted jointly.

With ``top_k`` the correction acts on the base's top-k tokens only; the remaining tokens keep
their base shape and absorb the leftover mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vmt.mep.bases import TableBase, UniformBase, WindowedLM
from vmt.mep.solvers import (
    CandidateData,
    ConditionalFit,
    conditional_log_prob,
    fit_conditional,
)

__all__ = [
    "MEPConfig",
    "MEPModel",
    "SMEPModel",
    "copy_similarity_features",
    "gmep_model",
    "windows_from_sequences",
]


@dataclass(frozen=True)
class MEPConfig:
    """Settings of an MEP model.

    Attributes:
        distances: far distances ``d`` whose pairs ``(x_{n−d}, x_n)`` are coupled.
        prior_variance: variance of the Gaussian prior on each multiplier per fitting token
            (penalty ``||λ||² / (2 · prior_variance · N)`` on the mean NLL); ``None`` fits
            without regularisation (population fits).
        top_k: restrict the correction to the base's top-k tokens (``None``: all tokens).
        bias: add a unigram bias ``λ_0(b)`` (used by GMEP).
        tie_distances: one coupling table shared by all distances.
        method: solver, ``"scipy"``, ``"torch"`` or ``"adam"``.
        tol: stopping rule on the largest gradient entry of the regularised dual.
        max_iter: iteration cap.
    """

    distances: tuple[int, ...]
    prior_variance: float | None = 10.0
    top_k: int | None = None
    bias: bool = False
    tie_distances: bool = False
    method: str = "scipy"
    tol: float = 1e-9
    max_iter: int = 2000

    def __post_init__(self) -> None:
        d = tuple(int(x) for x in self.distances)
        if not d:
            raise ValueError("distances must not be empty")
        if min(d) < 1 or len(set(d)) != len(d):
            raise ValueError(f"distances must be distinct and >= 1, got {d}")
        object.__setattr__(self, "distances", d)
        if self.prior_variance is not None and not (
            self.prior_variance > 0 and math.isfinite(self.prior_variance)
        ):
            raise ValueError(f"prior_variance must be positive or None, got {self.prior_variance}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def windows_from_sequences(sequences, length: int) -> np.ndarray:
    """All windows of ``length`` consecutive tokens: (row, length) int64, from (batch, time)
    tokens or a list of 1-D arrays; the last column is the predicted token."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    out = []
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        if s.ndim != 1:
            raise ValueError(f"each sequence must be 1-D, got shape {s.shape}")
        if s.size >= length:
            out.append(np.lib.stride_tricks.sliding_window_view(s, length))
    if not out:
        raise ValueError(f"no sequence has {length} tokens")
    return np.concatenate(out).astype(np.int64)


class MEPModel:
    """Base model corrected by far-pair multipliers (see the module docstring).

    Args:
        base: dense base with ``vocab_size``, ``window`` and ``log_probs(context)``.
        config: :class:`MEPConfig`.
    """

    def __init__(self, base: TableBase | WindowedLM, config: MEPConfig):
        self.base = base
        self.config = config
        self.vocab_size = int(base.vocab_size)
        near = [d for d in config.distances if d <= base.window]
        if near and not config.bias and base.window > 0:
            raise ValueError(
                f"distances {near} lie inside the base window ({base.window}); only pairs that "
                "straddle the window can change the base"
            )
        V = self.vocab_size
        self.n_groups = 1 if config.tie_distances else len(config.distances)
        self._offset = V if config.bias else 0
        self.n_params = self._offset + self.n_groups * V * V
        self.params = torch.zeros(self.n_params, dtype=torch.float64)
        self.fit_result: ConditionalFit | None = None

    @property
    def context_length(self) -> int:
        """Tokens of context each prediction needs."""
        return max(max(self.config.distances), self.base.window)

    @property
    def couplings(self) -> torch.Tensor:
        """(group, vocab, vocab) multipliers ``λ_d(a, b)`` (a: far token, b: next token)."""
        V = self.vocab_size
        return self.params[self._offset :].reshape(self.n_groups, V, V)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.params[: self._offset] if self.config.bias else None

    def _split(self, windows) -> tuple[np.ndarray, np.ndarray]:
        w = np.asarray(windows)
        if w.ndim != 2 or w.shape[1] != self.context_length + 1:
            raise ValueError(
                f"windows must be (row, {self.context_length + 1}) (context then next token), "
                f"got shape {w.shape}"
            )
        if w.size and (w.min() < 0 or w.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size})")
        return w[:, :-1].astype(np.int64), w[:, -1].astype(np.int64)

    def _rows(self, context, target, base_lp, transpose: bool = False, weights=None):
        """Candidate rows; ``transpose`` indexes couplings as ``λ(b, far)`` (backward model)."""
        V, n = self.vocab_size, context.shape[0]
        if self.config.top_k is not None and self.config.top_k < V:
            k = self.config.top_k
            cand = np.argsort(-base_lp, axis=1, kind="stable")[:, :k]
            cand_lp = np.take_along_axis(base_lp, cand, 1)
            rest_lp = base_lp.copy()
            np.put_along_axis(rest_lp, cand, -np.inf, 1)
            log_rest = np.logaddexp.reduce(rest_lp, axis=1)
        else:
            cand = np.broadcast_to(np.arange(V), (n, V))
            cand_lp = base_lp
            log_rest = np.full(n, -np.inf)
        L = context.shape[1]
        far = np.stack([context[:, L - d] for d in self.config.distances], axis=1)  # (n, D)
        groups = np.zeros(len(self.config.distances), dtype=np.int64) if \
            self.config.tie_distances else np.arange(len(self.config.distances))
        a, b = (cand[:, :, None], far[:, None, :]) if transpose else (far[:, None, :], cand[:, :, None])
        idx = self._offset + groups[None, None, :] * V * V + a * V + b  # (n, k, D)
        val = np.ones(idx.shape)
        if self.config.bias:
            idx = np.concatenate([cand[:, :, None], idx], axis=2)
            val = np.concatenate([np.ones(cand.shape + (1,)), val], axis=2)
        hit = cand == target[:, None]
        tpos = np.where(hit.any(1), hit.argmax(1), -1)
        tlp = base_lp[np.arange(n), target]
        return CandidateData(cand_lp, log_rest, tpos, tlp, idx, val, self.n_params, weights)

    def candidate_data(self, windows, weights=None) -> CandidateData:
        """Fitting rows for (row, context_length + 1) windows."""
        ctx, tgt = self._split(windows)
        return self._rows(ctx, tgt, self.base.log_probs(ctx), weights=weights)

    def _l2(self, n_tokens: float) -> float:
        if self.config.prior_variance is None:
            return 0.0
        return 1.0 / (self.config.prior_variance * n_tokens)

    def fit(self, windows, weights=None, **solver_kwargs) -> ConditionalFit:
        """Fit the multipliers on (row, context_length + 1) windows (optionally weighted,
        e.g. by exact stationary probabilities for a population fit)."""
        data = self.candidate_data(windows, weights)
        return self.fit_data(data, **solver_kwargs)

    def fit_data(self, data: CandidateData, **solver_kwargs) -> ConditionalFit:
        c = self.config
        kwargs = {"method": c.method, "tol": c.tol, "max_iter": c.max_iter} | solver_kwargs
        result = fit_conditional(data, l2=self._l2(data.n_rows), **kwargs)
        self.params = result.params
        self.fit_result = result
        return result

    def log_prob(self, windows) -> np.ndarray:
        """(row,) log-probability of each window's last token given its context."""
        data = self.candidate_data(windows)
        return conditional_log_prob(self.params, data).numpy()

    def next_log_probs(self, context) -> np.ndarray:
        """(row, vocab) full corrected next-token log-probabilities for (row, context_length)
        contexts."""
        ctx = np.asarray(context, dtype=np.int64)
        if ctx.ndim != 2 or ctx.shape[1] != self.context_length:
            raise ValueError(f"context must be (row, {self.context_length}), got {ctx.shape}")
        return self._full(ctx, self.base.log_probs(ctx), transpose=False)

    def _full(self, ctx, base_lp, transpose: bool) -> np.ndarray:
        n, V = ctx.shape[0], self.vocab_size
        scores = np.empty((n, V))
        for b in range(V):  # score every token as if it were the target
            data = self._rows(ctx, np.full(n, b), base_lp, transpose=transpose)
            scores[:, b] = conditional_log_prob(self.params, data).numpy()
        return scores


def gmep_model(vocab_size: int, order: int, prior_variance: float | None = 10.0,
               **config) -> MEPModel:
    """GMEP: uniform base, unigram bias and couplings at every distance ``1..order``."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    cfg = MEPConfig(distances=tuple(range(1, order + 1)), prior_variance=prior_variance,
                    bias=True, **config)
    return MEPModel(UniformBase(vocab_size), cfg)


@dataclass
class SMEPModel:
    """Symmetric MEP: couplings ``J_d(a, b)`` for a pair (earlier token a, later token b) at
    distance d, shared by a forward model ``q_f(x_n | past window) · exp(Σ_d J_d(x_{n−d}, x_n))``
    and a backward model ``q_b(x_n | future window) · exp(Σ_d J_d(x_n, x_{n+d}))``.

    Args:
        forward_base: dense base over the past (oldest token first).
        backward_base: dense base over the future, reading reversed text (nearest future
            token last in its context).
        config: :class:`MEPConfig`; ``bias`` and ``top_k`` apply to both directions.
    """

    forward_base: TableBase
    backward_base: TableBase
    config: MEPConfig
    forward: MEPModel = field(init=False)
    backward: MEPModel = field(init=False)

    def __post_init__(self) -> None:
        if self.forward_base.vocab_size != self.backward_base.vocab_size:
            raise ValueError("forward and backward bases must share the vocabulary")
        self.forward = MEPModel(self.forward_base, self.config)
        self.backward = MEPModel(self.backward_base, self.config)
        if self.forward.context_length != self.backward.context_length:
            raise ValueError("forward and backward bases must have the same window")
        self.fit_result: ConditionalFit | None = None

    @property
    def couplings(self) -> torch.Tensor:
        return self.forward.couplings

    def candidate_data(self, windows, weights=None) -> CandidateData:
        """Forward rows from ``windows`` and backward rows from the same windows reversed."""
        windows = np.asarray(windows)
        fwd = self.forward.candidate_data(windows, weights)
        ctx, tgt = self.backward._split(windows[:, ::-1])
        bwd = self.backward._rows(ctx, tgt, self.backward_base.log_probs(ctx), transpose=True,
                                  weights=weights)
        return CandidateData.concat([fwd, bwd])

    def fit(self, windows, weights=None, **solver_kwargs) -> ConditionalFit:
        data = self.candidate_data(windows, weights)
        result = self.forward.fit_data(data, **solver_kwargs)
        self.backward.params = result.params
        self.fit_result = result
        return result

    def log_prob(self, windows) -> tuple[np.ndarray, np.ndarray]:
        """``(forward, backward)`` (row,) log-probabilities: of the last token of each window
        given its past, and of the first token given the window's future."""
        windows = np.asarray(windows)
        f = self.forward.log_prob(windows)
        ctx, tgt = self.backward._split(windows[:, ::-1])
        data = self.backward._rows(ctx, tgt, self.backward_base.log_probs(ctx), transpose=True)
        return f, conditional_log_prob(self.backward.params, data).numpy()

    def backward_next_log_probs(self, context) -> np.ndarray:
        """(row, vocab) backward conditionals for reversed contexts (row, context_length)."""
        ctx = np.asarray(context, dtype=np.int64)
        return self.backward._full(ctx, self.backward_base.log_probs(ctx), transpose=True)


def copy_similarity_features(
    cand: np.ndarray,
    far: np.ndarray,
    groups: Sequence[Sequence[int]],
    embeddings: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Structured far-pair features for a real vocabulary.

    The coupling ``λ_d(a, b) = α_g · [a = b] + β_g · cos(e_a, e_b)`` (g: the distance group of
    d) needs two numbers per group instead of ``V²`` per distance.

    Args:
        cand: (row, cand) int64 candidate token ids (``-1`` = padding).
        far: (row, distance) int64 far-context tokens (``-1`` = missing).
        groups: lists of column indices of ``far`` forming each distance group.
        embeddings: (vocab, hidden) token embeddings for the similarity feature (omit for
            copy features only).

    Returns:
        ``(feat_index, feat_value, n_params)`` with (row, cand, feature) arrays: the mean over
        each group of ``[a = b]`` and (if embeddings) of ``cos(e_a, e_b)``.
    """
    cand = np.asarray(cand, dtype=np.int64)
    far = np.asarray(far, dtype=np.int64)
    if cand.ndim != 2 or far.ndim != 2 or cand.shape[0] != far.shape[0]:
        raise ValueError(f"cand (row, cand) and far (row, distance) mismatch: "
                         f"{cand.shape} vs {far.shape}")
    G = len(groups)
    feats = []
    present = (far >= 0)
    same = (cand[:, :, None] == far[:, None, :]) & present[:, None, :] & (cand[:, :, None] >= 0)
    for cols in groups:
        cols = list(cols)
        denom = max(len(cols), 1)
        feats.append(same[:, :, cols].sum(-1) / denom)
    if embeddings is not None:
        emb = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
        sim = np.empty(same.shape)
        for start in range(0, cand.shape[0], 128):  # bounded memory: (128, cand, hidden)
            rows = slice(start, start + 128)
            c = emb[torch.as_tensor(cand[rows].clip(min=0))]  # (row, cand, hidden)
            f = emb[torch.as_tensor(far[rows].clip(min=0))]  # (row, distance, hidden)
            sim[rows] = torch.einsum("nkh,ndh->nkd", c, f).double().numpy()
        sim = sim * present[:, None, :] * (cand[:, :, None] >= 0)
        for cols in groups:
            cols = list(cols)
            feats.append(sim[:, :, cols].sum(-1) / max(len(cols), 1))
    value = np.stack(feats, axis=2)
    n_params = value.shape[2]
    index = np.broadcast_to(np.arange(n_params), value.shape).copy()
    assert n_params == G * (2 if embeddings is not None else 1)
    return index, value, n_params
