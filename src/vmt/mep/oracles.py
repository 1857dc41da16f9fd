"""Exact oracles for testing MEP models: synthetic sources with known conditionals.

Every source here is a stationary Markov chain of some order ``r`` over a tiny vocabulary,
given by its conditional table ``p(x_n | x_{n−r}, ..., x_{n−1})``. From that table everything
is exact: the stationary distribution of ``r``-blocks, the truncated conditionals a window
of ``w < r`` tokens allows, the truncation loss ``I(X_n; far | window)``, and the
population (infinite-data) weights used to fit MEP models without sampling noise.

Sources: :func:`markov_source` (random Dirichlet table of any order),
:func:`pairwise_source` (logits additive over pairs ``(x_{n−d}, x_n)``, the case GMEP can
represent exactly), :func:`higher_order_source` (random logits over whole contexts, the
generic case). :func:`enumerate_sequences` is the brute-force enumerator.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MarkovSource",
    "enumerate_sequences",
    "higher_order_source",
    "markov_source",
    "pairwise_source",
]


def enumerate_sequences(vocab_size: int, length: int) -> np.ndarray:
    """Every sequence of ``length`` tokens, in C order: (vocab_size**length, length) int64."""
    if vocab_size < 1 or length < 0:
        raise ValueError(f"need vocab_size >= 1 and length >= 0, got {vocab_size}, {length}")
    if vocab_size**length > 5_000_000:
        raise ValueError(f"{vocab_size}**{length} sequences are too many to enumerate")
    return np.array(list(itertools.product(range(vocab_size), repeat=length)),
                    dtype=np.int64).reshape(-1, length)


@dataclass(frozen=True)
class MarkovSource:
    """A stationary order-``r`` Markov source with exact conditionals.

    Attributes:
        cond: array of shape ``(vocab,) * (order + 1)``; ``cond[a_1, ..., a_r, b]`` is
            ``p(x_n = b | x_{n−r} = a_1, ..., x_{n−1} = a_r)`` (oldest token first).
    """

    cond: np.ndarray

    def __post_init__(self) -> None:
        c = np.asarray(self.cond, dtype=np.float64)
        if c.ndim < 1 or len(set(c.shape)) != 1:
            raise ValueError(f"cond must have shape (vocab,)*(order+1), got {c.shape}")
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("cond must be finite and non-negative")
        if not np.allclose(c.sum(-1), 1.0, atol=1e-12):
            raise ValueError("cond must sum to 1 over its last axis")
        object.__setattr__(self, "cond", c)

    @property
    def vocab_size(self) -> int:
        return int(self.cond.shape[0])

    @property
    def order(self) -> int:
        return self.cond.ndim - 1

    def stationary(self, tol: float = 1e-15, max_iter: int = 100_000) -> np.ndarray:
        """Stationary distribution of ``order``-blocks, shape ``(vocab,) * order``."""
        V, r = self.vocab_size, self.order
        if r == 0:
            return np.ones(())
        pi = np.full((V,) * r, V**-r)
        for _ in range(max_iter):
            joint = pi[..., None] * self.cond  # (V,)*(r+1)
            new = joint.sum(0)
            if np.abs(new - pi).max() < tol:
                return new / new.sum()
            pi = new
        raise RuntimeError("stationary distribution did not converge (the chain may not mix)")

    def block(self, length: int) -> np.ndarray:
        """Stationary joint of ``length`` consecutive tokens, shape ``(vocab,) * length``."""
        r = self.order
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        joint = self.stationary()
        if length <= r:
            return joint.sum(axis=tuple(range(r - length))) if length < r else joint
        for _ in range(length - r):
            cond = self.cond.reshape((1,) * (joint.ndim - r) + self.cond.shape)
            joint = joint[..., None] * cond
        return joint

    def truncated(self, window: int) -> np.ndarray:
        """Exact ``p(x_n | last window tokens)``, shape ``(vocab,) * (window + 1)``."""
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        joint = self.block(window + 1)
        return joint / joint.sum(-1, keepdims=True)

    def backward_truncated(self, window: int) -> np.ndarray:
        """Exact ``p(x_n | next window tokens)``: shape ``(vocab,) * (window + 1)`` with the
        nearest future token first and the predicted token last (the reversed-time layout)."""
        joint = self.block(window + 1)  # x_n, x_{n+1}, ..., x_{n+w}
        rev = np.transpose(joint, tuple(range(window, -1, -1)))  # x_{n+w}, ..., x_n
        return rev / rev.sum(-1, keepdims=True)

    def population(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """All windows of ``length`` tokens with their stationary probabilities.

        Returns:
            ``(windows, weights)``: (vocab**length, length) int64 and (vocab**length,) float64.
        """
        joint = self.block(length)
        return enumerate_sequences(self.vocab_size, length), joint.reshape(-1)

    def truncation_loss(self, window: int) -> float:
        """``I(X_n; far | window)`` in nats: the expected KL from the true conditional to the
        exact window-``window`` conditional (zero when ``window >= order``)."""
        r = max(self.order, window)
        joint = self.block(r + 1)
        full = joint / joint.sum(-1, keepdims=True)
        trunc = self.truncated(window).reshape((1,) * (r - window) + (self.vocab_size,) * (window + 1))
        mask = joint > 0
        return float((joint[mask] * (np.log(full[mask]) - np.log(np.broadcast_to(trunc, joint.shape)[mask]))).sum())

    def sample(self, n_seq: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n_seq, length) int64 stationary samples."""
        if n_seq < 1 or length < self.order:
            raise ValueError(f"need n_seq >= 1 and length >= order={self.order}")
        V, r = self.vocab_size, self.order
        out = np.empty((n_seq, length), dtype=np.int64)
        start = rng.choice(V**r, size=n_seq, p=self.stationary().reshape(-1)) if r else \
            np.zeros(n_seq, dtype=np.int64)
        if r:
            out[:, :r] = np.stack(np.unravel_index(start, (V,) * r), axis=1)
        flat = self.cond.reshape(-1, V)
        cdf = np.cumsum(flat, axis=1)
        for t in range(r, length):
            ctx = np.ravel_multi_index(tuple(out[:, t - r + j] for j in range(r)), (V,) * r) \
                if r else np.zeros(n_seq, dtype=np.int64)
            u = rng.random(n_seq)[:, None]
            out[:, t] = np.minimum((u > cdf[ctx]).sum(1), V - 1)
        return out

    def log_prob_next(self, windows: np.ndarray) -> np.ndarray:
        """(row,) exact ``log p(x_n | past)`` for windows (row, length >= order+1) whose last
        column is ``x_n``."""
        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[1] < self.order + 1:
            raise ValueError(f"windows must be (row, >= {self.order + 1}), got {windows.shape}")
        idx = tuple(windows[:, windows.shape[1] - self.order - 1 + j] for j in range(self.order + 1))
        return np.log(self.cond[idx])


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def markov_source(vocab_size: int, order: int, rng: np.random.Generator,
                  concentration: float = 1.0) -> MarkovSource:
    """Random order-``order`` chain: each conditional row drawn from Dirichlet(concentration)."""
    if vocab_size < 2 or order < 0 or concentration <= 0:
        raise ValueError("need vocab_size >= 2, order >= 0, concentration > 0")
    rows = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size**order)
    rows = np.maximum(rows, 1e-6)
    rows /= rows.sum(-1, keepdims=True)
    return MarkovSource(rows.reshape((vocab_size,) * (order + 1)))


def pairwise_source(vocab_size: int, order: int, rng: np.random.Generator,
                    scale: float = 1.0, decay: float = 1.0) -> tuple[MarkovSource, np.ndarray, np.ndarray]:
    """Source whose next-token logits are pairwise additive:
    ``log p(b | past) = h(b) + Σ_{d=1..order} J_d(x_{n−d}, b) − log Z``.

    Args:
        scale: standard deviation of the couplings ``J``.
        decay: coupling at distance ``d`` is multiplied by ``decay**(d−1)``.

    Returns:
        ``(source, bias, couplings)`` with bias (vocab,) and couplings (order, vocab, vocab),
        ``couplings[d−1, a, b] = J_d(a, b)``.
    """
    if vocab_size < 2 or order < 1:
        raise ValueError("need vocab_size >= 2 and order >= 1")
    V = vocab_size
    h = rng.normal(0.0, 0.5, V)
    J = rng.normal(0.0, scale, (order, V, V)) * (decay ** np.arange(order))[:, None, None]
    logits = np.broadcast_to(h, (V,) * (order + 1)).copy()
    for d in range(1, order + 1):
        axis = order - d  # position of x_{n-d} in (x_{n-r}, ..., x_{n-1}, b)
        shape = [1] * (order + 1)
        shape[axis], shape[-1] = V, V
        logits = logits + J[d - 1].reshape(shape)
    return MarkovSource(_softmax(logits)), h, J


def higher_order_source(vocab_size: int, order: int, rng: np.random.Generator,
                        scale: float = 1.5) -> MarkovSource:
    """Generic higher-order source: independent Gaussian logits for every full context."""
    if vocab_size < 2 or order < 1:
        raise ValueError("need vocab_size >= 2 and order >= 1")
    logits = rng.normal(0.0, scale, (vocab_size,) * (order + 1))
    return MarkovSource(_softmax(logits))
