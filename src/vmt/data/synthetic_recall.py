"""A synthetic long-range task: associative recall across a stretch of filler.

Every sequence starts with ``n_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...`` (distinct keys),
followed by random filler tokens. Here and there a *query* replaces a filler token: one of
the stored keys again. The model must predict, at the query position, the value stored with
that key; no other position is scored. The *distance* of a query is its position minus the
position of the value it asks for. Queries never reveal values, so every query has to reach
back to the start of the sequence.

Vocabulary layout: fillers ``0 .. n_filler-1``, keys next, values last.
Targets use ``-100`` (the ``ignore_index`` of ``torch.nn.functional.cross_entropy``) at
unscored positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100


@dataclass(frozen=True)
class RecallTaskConfig:
    """Sizes of the recall task.

    Attributes:
        n_pairs: key-value pairs at the start of every sequence.
        n_keys: size of the key alphabet (>= n_pairs).
        n_values: size of the value alphabet; chance accuracy is ``1 / n_values``.
        n_filler: size of the filler alphabet.
    """

    n_pairs: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 16

    def __post_init__(self) -> None:
        for name in ("n_pairs", "n_keys", "n_values", "n_filler"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_keys < self.n_pairs:
            raise ValueError(f"n_keys={self.n_keys} must be >= n_pairs={self.n_pairs}")

    @property
    def vocab_size(self) -> int:
        return self.n_filler + self.n_keys + self.n_values

    @property
    def key_offset(self) -> int:
        return self.n_filler

    @property
    def value_offset(self) -> int:
        return self.n_filler + self.n_keys

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values


def _prefix(cfg: RecallTaskConfig, batch: int, generator: torch.Generator):
    """Keys (batch, pair) and values (batch, pair) as token ids, keys distinct per row."""
    keys = torch.rand(batch, cfg.n_keys, generator=generator).argsort(dim=1)[:, : cfg.n_pairs]
    values = torch.randint(cfg.n_values, (batch, cfg.n_pairs), generator=generator)
    return keys + cfg.key_offset, values + cfg.value_offset


def _base(cfg: RecallTaskConfig, batch: int, length: int, generator: torch.Generator):
    if length < 2 * cfg.n_pairs + 1:
        raise ValueError(
            f"length must be at least 2 * n_pairs + 1 = {2 * cfg.n_pairs + 1}, got {length}"
        )
    tokens = torch.randint(cfg.n_filler, (batch, length), generator=generator)
    keys, values = _prefix(cfg, batch, generator)
    tokens[:, 0 : 2 * cfg.n_pairs : 2] = keys
    tokens[:, 1 : 2 * cfg.n_pairs : 2] = values
    targets = torch.full((batch, length), IGNORE, dtype=torch.int64)
    return tokens, targets, keys, values


def sample_training_batch(
    cfg: RecallTaskConfig,
    batch: int,
    length: int,
    query_prob: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Sequences with queries at random positions (each filler slot a query w.p. query_prob).

    Returns:
        tokens: (batch, time) int64; targets: (batch, time) int64, ``-100`` where unscored.
    """
    if not 0.0 < query_prob <= 1.0:
        raise ValueError(f"query_prob must be in (0, 1], got {query_prob}")
    tokens, targets, keys, values = _base(cfg, batch, length, generator)
    start = 2 * cfg.n_pairs
    is_query = torch.rand(batch, length, generator=generator) < query_prob
    is_query[:, :start] = False
    which = torch.randint(cfg.n_pairs, (batch, length), generator=generator)
    tokens = torch.where(is_query, keys.gather(1, which), tokens)
    targets = torch.where(is_query, values.gather(1, which), targets)
    return tokens, targets


def sample_eval_batch(
    cfg: RecallTaskConfig,
    batch: int,
    distances: list[int],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sequences with one query per distance in ``distances``.

    Each query asks for a random pair ``i`` and sits ``d`` positions after value ``i``.

    Returns:
        tokens: (batch, time) int64 with ``time = 2 * n_pairs + max(distances)``;
        targets: (batch, time) int64 (``-100`` except at queries);
        query_pos: (batch, len(distances)) int64 position of the query at each distance.
    """
    if not distances or min(distances) < 2 * cfg.n_pairs:
        raise ValueError(
            f"distances must be non-empty and >= 2 * n_pairs = {2 * cfg.n_pairs}, got {distances}"
        )
    ds = sorted(distances)
    if any(b - a < 2 * cfg.n_pairs for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"distances must differ by at least 2 * n_pairs, got {distances}")
    length = 2 * cfg.n_pairs + max(distances)
    tokens, targets, keys, values = _base(cfg, batch, length, generator)
    which = torch.randint(cfg.n_pairs, (batch, len(distances)), generator=generator)
    value_pos = 2 * which + 1
    query_pos = value_pos + torch.tensor(distances)[None, :]
    tokens.scatter_(1, query_pos, keys.gather(1, which))
    targets.scatter_(1, query_pos, values.gather(1, which))
    return tokens, targets, query_pos


def write_answers(tokens: Tensor, targets: Tensor) -> Tensor:
    """The sequences a generative model reads: every query followed by its answer.

    The value a query asks for is written over the token right after the query (a filler, or
    a query that is then dropped), so the stream says what it asks and a language model of the
    stream learns to answer. A query in the last position keeps no answer. The sequences are
    otherwise the same: the same keys, values, fillers and query positions.

    Args:
        tokens: (batch, time) int64 from :func:`sample_training_batch`.
        targets: (batch, time) int64, ``-100`` where unscored.

    Returns:
        (batch, time) int64.
    """
    if tokens.shape != targets.shape or tokens.dim() != 2:
        raise ValueError(
            f"tokens and targets must both be (batch, time), got {tuple(tokens.shape)} and {tuple(targets.shape)}"
        )
    answered = torch.zeros_like(targets, dtype=torch.bool)
    answered[:, 1:] = targets[:, :-1] != IGNORE
    answers = torch.full_like(targets, IGNORE)
    answers[:, 1:] = targets[:, :-1]
    return torch.where(answered, answers, tokens)


def single_query(cfg: RecallTaskConfig, tokens: Tensor, query_pos: Tensor, which: int,
                 generator: torch.Generator) -> Tensor:
    """One row of an evaluation batch cut after its query ``which``, the other queries before
    it replaced by fresh filler.

    For a generative model that was trained on answered queries (:func:`write_answers`), an
    earlier query with no answer after it is a stream it has never seen; with the earlier
    queries turned to filler the prefix holds one question, asked ``d`` tokens after its value.

    Args:
        tokens: (time,) int64, one row of :func:`sample_eval_batch`.
        query_pos: (queries,) int64, that row's query positions (ascending distances).
        which: index of the query to keep.

    Returns:
        (query_pos[which] + 1,) int64 ending with the query.
    """
    if tokens.dim() != 1 or query_pos.dim() != 1:
        raise ValueError(f"tokens and query_pos must be 1-D, got {tuple(tokens.shape)} and {tuple(query_pos.shape)}")
    if not 0 <= which < len(query_pos):
        raise ValueError(f"which must index one of the {len(query_pos)} queries, got {which}")
    end = int(query_pos[which])
    prefix = tokens[: end + 1].clone()
    earlier = query_pos[query_pos < end]
    prefix[earlier] = torch.randint(cfg.n_filler, (len(earlier),), generator=generator)
    return prefix
