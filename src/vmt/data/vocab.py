"""A compact emission vocabulary over a pretrained tokenizer's ids.

A softmax over all 49,152 SmolLM2 tokens costs ``vocab x state`` per position; a corpus uses
far fewer. :class:`Vocabulary` keeps the ids seen in training (optionally the most frequent
``max_size``) and merges the rest into ``<unk>`` (id 0). Spreading ``<unk>``'s probability
evenly over the merged ids gives a distribution over the *full* vocabulary, so
:attr:`token_penalty` (``log(#merged)`` nats for ``<unk>``, 0 otherwise) turns any bound in
the compact vocabulary into an honest bound over the full one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Vocabulary:
    """``kept``: sorted LM ids with their own emission id (``1..len(kept)``); the rest is ``<unk>``."""

    kept: tuple[int, ...]
    full_size: int

    def __post_init__(self) -> None:
        bad = [k for k in self.kept if isinstance(k, bool) or not isinstance(k, int)]
        if bad:
            raise ValueError(f"vocabulary ids must be integers, got {bad[0]!r}")
        if len(self.kept) >= self.full_size:
            raise ValueError("a compact vocabulary must merge at least one id into <unk>")
        if list(self.kept) != sorted(set(self.kept)):
            raise ValueError("kept ids must be sorted and unique")
        if self.kept and (self.kept[0] < 0 or self.kept[-1] >= self.full_size):
            raise ValueError(f"kept ids must lie in [0, {self.full_size})")

    @property
    def size(self) -> int:
        return len(self.kept) + 1

    @classmethod
    def build(cls, documents: Sequence[torch.Tensor], full_size: int, max_size: int | None = None) -> Vocabulary:
        counts = torch.bincount(torch.cat([d.flatten() for d in documents]), minlength=full_size)
        if counts.numel() > full_size:
            raise ValueError(f"token ids exceed the full vocabulary size {full_size}")
        seen = torch.nonzero(counts).flatten()
        if max_size is not None and len(seen) > max_size - 1:
            top = torch.topk(counts, max_size - 1).indices
            seen = top
        return cls(tuple(sorted(seen.tolist())), full_size)

    def _table(self) -> torch.Tensor:
        table = torch.zeros(self.full_size, dtype=torch.long)
        table[torch.tensor(self.kept, dtype=torch.long)] = torch.arange(1, self.size)
        return table

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LM ids -> emission ids (unknown ids -> 0)."""
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.full_size):
            raise ValueError(f"token ids must lie in [0, {self.full_size})")
        return self._table()[tokens]

    def decode(self, ids: torch.Tensor, unk_id: int = 0) -> torch.Tensor:
        """Emission ids -> LM ids (``<unk>`` -> ``unk_id``)."""
        lookup = torch.tensor((unk_id,) + self.kept, dtype=torch.long)
        return lookup[ids]

    @property
    def token_penalty(self) -> torch.Tensor:
        """``(size,)`` nats to add per observed emission id for a full-vocabulary bound."""
        pen = torch.zeros(self.size)
        pen[0] = math.log(self.full_size - len(self.kept))
        return pen
