"""Fixed-budget KV caches: compaction of a ``DynamicCache`` and the eviction-policy interface.

A stream of one sequence (batch 1) is read by a causal LM with a Hugging Face
``DynamicCache``. Between forward calls a policy may *compact* the cache: keep a subset of
cached tokens (the same indices on every layer and head), in temporal order, and move them
to the slots ``0..kept-1``. Because Llama caches keys after RoPE, each kept key is re-rotated
by ``new_slot - old_slot`` (see :mod:`vmt.memory.rope`); new tokens are then placed at
``cache length + i`` by the model itself, so positions are those inside the compacted cache.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from vmt.memory.rope import rerotate_keys


def cache_length(cache) -> int:
    """Number of cached tokens (time) in a ``DynamicCache`` (0 when empty)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def compact_cache(cache, keep: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Keep only the cached tokens ``keep`` (in that order) on every layer, re-rotating keys.

    Args:
        cache: a ``DynamicCache`` whose layers hold keys/values (batch, kv_heads, time, head_dim).
        keep: (kept,) int64 strictly increasing indices into the cached time axis.
        inv_freq: (head_dim/2,) RoPE inverse frequencies of the model.

    The kept token at old slot ``keep[j]`` moves to slot ``j``; its key is rotated by
    ``j - keep[j]`` (zero for tokens that do not move, e.g. attention sinks). Modifies
    ``cache`` in place between forward calls (never call it inside a forward).
    """
    n = cache_length(cache)
    if keep.dim() != 1 or keep.dtype != torch.int64:
        raise ValueError(f"keep must be (kept,) int64, got {tuple(keep.shape)} {keep.dtype}")
    if keep.numel() > 0:
        if int(keep.min()) < 0 or int(keep.max()) >= n:
            raise ValueError(f"keep indices must lie in [0, {n}), got [{int(keep.min())}, {int(keep.max())}]")
        if keep.numel() > 1 and bool((keep[1:] <= keep[:-1]).any()):
            raise ValueError("keep indices must be strictly increasing (temporal order)")
    delta = torch.arange(keep.numel(), dtype=torch.int64) - keep
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        idx = keep.to(layer.keys.device)
        keys = layer.keys.index_select(2, idx)
        layer.keys = rerotate_keys(keys, delta, inv_freq) if bool(delta.any()) else keys
        layer.values = layer.values.index_select(2, idx)


@dataclass
class CacheState:
    """Bookkeeping of what the cache holds, one entry per cached token (time,).

    Attributes:
        cache: the ``DynamicCache`` (``None`` before the first forward).
        positions: (time,) int64 index of each cached token in the original stream.
        tokens: (time,) int64 token ids.
        scores: (time,) float64 retention scores (SirLLM: decayed surprisal in nats).
    """

    cache: object = None
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def append(self, positions: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> None:
        """Record newly cached tokens: three (new,) tensors."""
        if not (positions.shape == tokens.shape == scores.shape) or positions.dim() != 1:
            raise ValueError(
                f"positions, tokens, scores must be equal (new,) shapes, got {tuple(positions.shape)}, "
                f"{tuple(tokens.shape)}, {tuple(scores.shape)}"
            )
        self.positions = torch.cat([self.positions, positions.to(torch.int64)])
        self.tokens = torch.cat([self.tokens, tokens.to(torch.int64)])
        self.scores = torch.cat([self.scores, scores.to(torch.float64)])

    def select(self, keep: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Compact the cache and the bookkeeping to the indices ``keep`` (kept,)."""
        if self.cache is not None and cache_length(self.cache) != len(self):
            raise RuntimeError(
                f"cache holds {cache_length(self.cache)} tokens but bookkeeping {len(self)}"
            )
        if self.cache is not None:
            compact_cache(self.cache, keep, inv_freq)
        self.positions = self.positions[keep]
        self.tokens = self.tokens[keep]
        self.scores = self.scores[keep]

    def clone(self) -> CacheState:
        """An independent copy (cache tensors included)."""
        return CacheState(
            cache=copy.deepcopy(self.cache),
            positions=self.positions.clone(),
            tokens=self.tokens.clone(),
            scores=self.scores.clone(),
        )


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class EvictionPolicy(ABC):
    """Which cached tokens to keep when new tokens would overflow the budget.

    Subclasses set ``budget`` (maximum cached tokens, ``None`` = unbounded) and ``reserved``
    (tokens always kept, e.g. sinks + recent window), implement :meth:`select`, and may
    override :meth:`token_scores` and :meth:`end_round`. Policies hold no per-stream state:
    everything a stream needs lives in its :class:`CacheState`, so one policy serves many
    streams.
    """

    budget: int | None = None
    reserved: int = 0
    name: str = "policy"

    @property
    def max_incoming(self) -> int | None:
        """Largest number of tokens one forward call may add (``None`` = no limit)."""
        return None if self.budget is None else self.budget - self.reserved

    @abstractmethod
    def select(self, state: CacheState, n_incoming: int) -> torch.Tensor:
        """Indices (kept,) int64, strictly increasing, with ``kept <= budget - n_incoming``.

        Called only when ``len(state) + n_incoming > budget``.
        """

    def token_scores(
        self, token_logprobs: torch.Tensor, next_logprobs: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Retention scores of newly fed tokens; the default is the surprisal in nats.

        Args:
            token_logprobs: (time,) ``log p(y_i | y_<i)`` of the fed tokens (NaN where the
                stream has no prediction yet, i.e. its first token).
            next_logprobs: (time, vocab) log-probabilities at each fed position (predicting
                the following token).
            tokens: (time,) the fed token ids.

        Returns:
            (time,) float64 scores.
        """
        scores = -token_logprobs.to(torch.float64)
        return torch.nan_to_num(scores, nan=0.0)

    def end_round(self, state: CacheState) -> None:  # noqa: B027 - optional hook
        """Called after every dialogue round (turn); default does nothing."""

    def checked_select(self, state: CacheState, n_incoming: int) -> torch.Tensor:
        """:meth:`select` plus the budget and ordering checks every policy must satisfy."""
        if self.budget is None:
            raise RuntimeError("an unbounded policy never evicts")
        if n_incoming > self.max_incoming:
            raise ValueError(
                f"{n_incoming} incoming tokens exceed the {self.max_incoming} this policy can admit"
            )
        keep = self.select(state, n_incoming)
        if keep.numel() + n_incoming > self.budget:
            raise RuntimeError(
                f"{self.name} kept {keep.numel()} tokens; with {n_incoming} incoming that exceeds "
                f"the budget {self.budget}"
            )
        return keep


class FullContext(EvictionPolicy):
    """Never evict: the whole stream stays in the cache (the model's native window limits it)."""

    name = "full"

    def select(self, state: CacheState, n_incoming: int) -> torch.Tensor:
        raise RuntimeError("FullContext never evicts")


def sinks_and_recent(n_cached: int, n_sinks: int, n_keep: int) -> torch.Tensor:
    """Indices of the first ``n_sinks`` and the newest ``n_keep - n_sinks`` of ``n_cached`` tokens."""
    if n_keep >= n_cached:
        return torch.arange(n_cached, dtype=torch.int64)
    n_recent = n_keep - n_sinks
    head = torch.arange(min(n_sinks, n_keep), dtype=torch.int64)
    tail = torch.arange(n_cached - n_recent, n_cached, dtype=torch.int64) if n_recent > 0 else head[:0]
    return torch.cat([head, tail])
