"""Base models ``q_T(x_n | last T tokens)`` that MEP corrects.

A base reads the last ``window`` tokens of each context and returns next-token
log-probabilities. Small vocabularies use the dense interface ``log_probs(context)``:
(row, vocab). A real language model uses :meth:`WindowedLM.candidates`, which keeps only the
top-k tokens (plus requested extra tokens) of each row so nothing of size (row, vocab) is
stored.

* :class:`TableBase` — an explicit conditional table (e.g. the exact truncated conditional
  of a synthetic source).
* :class:`NGramBase` — an add-α smoothed n-gram table fitted from token sequences.
* :class:`UniformBase` — the uniform distribution (the GMEP base).
* :class:`WindowedLM` — any torch module mapping (batch, time) tokens to next-token logits
  (batch, time, vocab), or to an object with a ``.logits`` attribute (a Hugging Face causal
  LM), run on each context truncated to the window: a small trained transformer or SmolLM2
  plug in the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["LMCandidates", "NGramBase", "TableBase", "UniformBase", "WindowedLM"]


def _check_context(context, window: int, vocab_size: int) -> np.ndarray:
    ctx = np.asarray(context)
    if ctx.ndim != 2:
        raise ValueError(f"context must be (row, time), got shape {ctx.shape}")
    if ctx.shape[1] < window:
        raise ValueError(f"context has {ctx.shape[1]} tokens per row but the window is {window}")
    if ctx.size and (ctx.min() < 0 or ctx.max() >= vocab_size):
        raise ValueError(f"context tokens must lie in [0, {vocab_size})")
    return ctx.astype(np.int64)


class TableBase:
    """Base given by a conditional table of shape ``(vocab,) * (window + 1)``: the first
    ``window`` axes are the context (oldest first), the last the next token."""

    def __init__(self, table: np.ndarray):
        t = np.asarray(table, dtype=np.float64)
        if t.ndim < 1 or len(set(t.shape)) != 1:
            raise ValueError(f"table must have shape (vocab,)*(window+1), got {t.shape}")
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise ValueError("table must be finite and non-negative")
        if not np.allclose(t.sum(-1), 1.0, atol=1e-10):
            raise ValueError("table must sum to 1 over its last axis")
        self.table = t
        self.vocab_size = int(t.shape[-1])
        self.window = t.ndim - 1
        with np.errstate(divide="ignore"):
            self._log = np.log(t).reshape(-1, self.vocab_size)

    def log_probs(self, context: ArrayLike) -> np.ndarray:
        """(row, vocab) float64 next-token log-probabilities from the last ``window`` tokens
        of each context row (row, time)."""
        ctx = _check_context(context, self.window, self.vocab_size)
        if self.window == 0:
            return np.broadcast_to(self._log[0], (ctx.shape[0], self.vocab_size)).copy()
        last = ctx[:, ctx.shape[1] - self.window :]
        idx = np.ravel_multi_index(tuple(last.T), (self.vocab_size,) * self.window)
        return self._log[idx]


class UniformBase(TableBase):
    """The uniform next-token distribution (window 0)."""

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        super().__init__(np.full(vocab_size, 1.0 / vocab_size))


class NGramBase(TableBase):
    """Add-α smoothed n-gram model with a context of ``window`` tokens.

    Args:
        sequences: (batch, time) int tokens, or a list of 1-D arrays.
        vocab_size: vocabulary size.
        window: context length (``n − 1``).
        alpha: add-α smoothing (> 0 keeps every token possible).
    """

    def __init__(self, sequences: ArrayLike, vocab_size: int, window: int, alpha: float = 0.5):
        if window < 0 or vocab_size < 1:
            raise ValueError(f"need window >= 0 and vocab_size >= 1, got {window}, {vocab_size}")
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be positive and finite, got {alpha}")
        if vocab_size ** (window + 1) > 20_000_000:
            raise ValueError(f"a dense table of {vocab_size}**{window + 1} entries is too big")
        counts = np.zeros((vocab_size,) * (window + 1))
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        for s in seqs:
            if s.ndim != 1:
                raise ValueError(f"each sequence must be 1-D, got shape {s.shape}")
            if s.size and (s.min() < 0 or s.max() >= vocab_size):
                raise ValueError(f"tokens must lie in [0, {vocab_size})")
            if s.size <= window:
                continue
            grams = np.lib.stride_tricks.sliding_window_view(s, window + 1)
            np.add.at(counts, tuple(grams.T), 1.0)
        counts += alpha
        super().__init__(counts / counts.sum(-1, keepdims=True))


@dataclass
class LMCandidates:
    """Top-k candidates of a windowed LM for a set of predicted positions.

    Attributes:
        tokens: (row, cand) int64 candidate token ids (``-1`` marks padding).
        base_logp: (row, cand) float64 base log-probabilities (``-inf`` for padding).
        log_rest: (row,) float64 log base mass of all non-candidate tokens.
        target: (row,) int64 index of the observed token among the candidates, or ``-1``.
        target_base_logp: (row,) float64 base log-probability of the observed token.
    """

    tokens: np.ndarray
    base_logp: np.ndarray
    log_rest: np.ndarray
    target: np.ndarray
    target_base_logp: np.ndarray


class WindowedLM:
    """A next-token model truncated to the last ``window`` tokens.

    Args:
        module: torch module; ``module(tokens)`` with tokens (batch, time) int64 returns logits
            (batch, time, vocab) or an object with ``.logits`` of that shape.
        window: number of context tokens each prediction sees.
        batch_size: contexts per forward call.
    """

    def __init__(self, module: torch.nn.Module, window: int, batch_size: int = 64):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.module = module
        self.window = window
        self.batch_size = batch_size
        self._hf: bool | None = None

    @torch.no_grad()
    def _logits(self, windows: torch.Tensor) -> torch.Tensor:
        if self._hf is None:
            from transformers import PreTrainedModel

            self._hf = isinstance(self.module, PreTrainedModel)
        # Hugging Face models can skip the vocabulary projection for all but the last step.
        out = self.module(windows, logits_to_keep=1) if self._hf else self.module(windows)
        logits = out.logits if hasattr(out, "logits") else out
        if logits.ndim != 3 or logits.shape[0] != windows.shape[0] or \
                logits.shape[1] not in (1, windows.shape[1]):
            raise ValueError(
                f"module must return logits (batch, time, vocab); got {tuple(logits.shape)} "
                f"for input {tuple(windows.shape)}"
            )
        return torch.log_softmax(logits[:, -1].double(), dim=-1)

    def _windows(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D (time,), got shape {tokens.shape}")
        if positions.ndim != 1:
            raise ValueError(f"positions must be 1-D, got shape {positions.shape}")
        if positions.size and (positions.min() < self.window or positions.max() >= tokens.size):
            raise ValueError(
                f"positions must lie in [{self.window}, {tokens.size}) so each has a full window"
            )
        return positions[:, None] + np.arange(-self.window, 0)[None, :]

    def log_probs_at(self, tokens: ArrayLike, positions: ArrayLike) -> np.ndarray:
        """(row, vocab) float64 log-probabilities of token ``positions[row]`` given the
        ``window`` tokens before it (dense: only for small vocabularies)."""
        idx = self._windows(tokens, positions)
        tok = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        out = [self._logits(tok[torch.as_tensor(idx[i : i + self.batch_size])])
               for i in range(0, len(idx), self.batch_size)]
        return torch.cat(out).numpy()

    def log_probs(self, context: ArrayLike) -> np.ndarray:
        """Dense interface of the table bases: (row, vocab) from the last ``window`` tokens
        of each context row (row, time)."""
        ctx = np.asarray(context, dtype=np.int64)
        if ctx.ndim != 2 or ctx.shape[1] < self.window:
            raise ValueError(f"context must be (row, >= {self.window}), got shape {ctx.shape}")
        last = torch.as_tensor(ctx[:, ctx.shape[1] - self.window :])
        out = [self._logits(last[i : i + self.batch_size])
               for i in range(0, len(last), self.batch_size)]
        return torch.cat(out).numpy()

    def candidates(self, tokens: ArrayLike, positions: ArrayLike, k: int,
                   extra: ArrayLike | None = None) -> LMCandidates:
        """Top-``k`` tokens of the truncated model at each position, plus ``extra`` tokens.

        Args:
            tokens: (time,) int token ids of one document.
            positions: (row,) positions to predict (each needs ``window`` tokens before it).
            k: number of top candidates.
            extra: optional (row, m) int token ids to add as candidates (``-1`` = none), e.g.
                the tokens of the far context; duplicates are dropped.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        idx = self._windows(tokens, positions)
        tok = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        positions = np.asarray(positions, dtype=np.int64)
        n = len(positions)
        m = 0 if extra is None else np.asarray(extra).shape[1]
        if extra is not None and np.asarray(extra).shape != (n, m):
            raise ValueError(f"extra must be ({n}, m), got {np.asarray(extra).shape}")
        cand = np.full((n, k + m), -1, dtype=np.int64)
        logp = np.full((n, k + m), -np.inf)
        rest = np.empty(n)
        tgt_lp = np.empty(n)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            lp = self._logits(tok[torch.as_tensor(idx[start:stop])])  # (b, vocab)
            vocab = lp.shape[1]
            top = torch.topk(lp, min(k, vocab), dim=1).indices
            ids = top
            if m:
                ex = torch.as_tensor(np.asarray(extra[start:stop], dtype=np.int64))
                ids = torch.cat([top, ex], dim=1)
            ids_np = ids.numpy().copy()
            # drop duplicates and padding, keeping the first occurrence
            for r in range(ids_np.shape[0]):
                seen: set[int] = set()
                for c in range(ids_np.shape[1]):
                    t = int(ids_np[r, c])
                    if t < 0 or t >= vocab or t in seen:
                        ids_np[r, c] = -1
                    else:
                        seen.add(t)
            ids_t = torch.as_tensor(ids_np)
            valid = ids_t >= 0
            g = lp.gather(1, ids_t.clamp(min=0))
            g = torch.where(valid, g, torch.tensor(-math.inf, dtype=g.dtype))
            is_cand = torch.zeros_like(lp, dtype=torch.bool)
            rows, cols = torch.nonzero(valid, as_tuple=True)
            is_cand[rows, ids_t[rows, cols]] = True
            masked = lp.masked_fill(is_cand, -math.inf)
            cand[start:stop, : ids_np.shape[1]] = ids_np
            logp[start:stop, : ids_np.shape[1]] = g.numpy()
            rest[start:stop] = torch.logsumexp(masked, dim=1).numpy()
            tgt_lp[start:stop] = lp.gather(1, tok[torch.as_tensor(positions[start:stop])][:, None])[:, 0].numpy()
        targets = np.asarray(tokens, dtype=np.int64)[positions]
        hit = cand == targets[:, None]
        target = np.where(hit.any(1), hit.argmax(1), -1)
        return LMCandidates(cand, logp, rest, target, tgt_lp)
