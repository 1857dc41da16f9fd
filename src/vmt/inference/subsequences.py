"""Random contiguous subsequences, the length curriculum and suffix-parallel batches.

Suffix parallelisation: every suffix ``y_j .. y_L`` of one sampled sequence reads the same
reversed features (``h_k`` summarises ``y_k .. y_L`` whatever ``j`` is), so the ``k``-th state
of every selected suffix is sampled in the same batched step: ``L`` sequential steps give up
to ``L - 1`` subsequence ELBOs. A budget ``N`` caps the total number of sampled states;
subsequences are chosen longest-first until it is full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vmt.data.memmap import MemmapCorpus
from vmt.models.batch import ChainBatch, sampled_batch

FeatureLookup = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def suffix_rows(
    lengths: torch.Tensor, budget: int, min_length: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose suffixes longest-first within ``budget`` sampled states.

    Args:
        lengths: ``(batch,)`` valid length of each base sequence.
        budget: the most states that may be sampled in total (``N``).
        min_length: the shortest suffix worth an ELBO.

    Returns:
        ``(source, start, end)``, each ``(rows,)`` int64: row ``r`` is the suffix
        ``source[r]`` from ``start[r]`` to ``end[r]``.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be (batch,), got {tuple(lengths.shape)}")
    candidates = []
    for b, n in enumerate(lengths.tolist()):
        for j in range(0, n - min_length + 1):
            candidates.append((n - j, b, j))
    if not candidates:
        raise ValueError(f"no sequence is at least min_length={min_length} long")
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    if candidates[0][0] > budget:
        raise ValueError(
            f"the budget of {budget} states is smaller than one subsequence "
            f"({candidates[0][0]} states); raise the budget or shorten the subsequences"
        )
    chosen, used = [], 0
    for length, b, j in candidates:
        if used + length > budget:
            continue
        chosen.append((b, j, j + length))
        used += length
    chosen.sort()
    source, start, end = (torch.tensor(col, dtype=torch.long) for col in zip(*chosen, strict=True))
    return source, start, end


def suffix_parallel_batch(base: ChainBatch, budget: int, min_length: int = 2) -> ChainBatch:
    """Expand a batch of base sequences (rows starting at 0) into its selected suffixes."""
    if bool((base.start != 0).any()) or base.source is not None:
        raise ValueError("suffix expansion needs base rows that start at 0 and read themselves")
    source, start, end = suffix_rows(base.end - base.start, budget, min_length)
    return ChainBatch(
        obs=base.obs[source], start=start, end=end, features=base.features, source=source,
        reader_input=base.reader_input, reader_lengths=base.reader_lengths,
    )


def one_row_per_suffix(base: ChainBatch, budget: int, min_length: int = 2) -> list[ChainBatch]:
    """The same subsequences as :func:`suffix_parallel_batch`, each as its own batch.

    The slow way (one sequential pass per subsequence); kept as the baseline of
    ``vmt bench suffix-parallel``.
    """
    source, start, end = suffix_rows(base.end - base.start, budget, min_length)
    out = []
    for s, a, e in zip(source.tolist(), start.tolist(), end.tolist(), strict=True):
        out.append(
            ChainBatch(
                obs=base.obs[s : s + 1, a:e],
                start=torch.zeros(1, dtype=torch.long),
                end=torch.tensor([e - a]),
                features=None if base.features is None else base.features[s : s + 1, a:e],
                reader_input=None if base.reader_input is None else base.reader_input[s : s + 1, a:e],
                reader_lengths=None if base.reader_input is None else torch.tensor([e - a]),
            )
        )
    return out


@dataclass(frozen=True)
class Curriculum:
    """Lengths ``min_length, ..., max_length``, ``steps_per_length`` steps each, then ``max_length``."""

    min_length: int = 2
    max_length: int = 64
    steps_per_length: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.steps_per_length < 0:
            raise ValueError("steps_per_length must be >= 0")

    def length_at(self, step: int) -> int:
        if self.steps_per_length == 0:
            return self.max_length
        return min(self.max_length, self.min_length + step // self.steps_per_length)


class SubsequenceSampler:
    """Samples batches of random contiguous subsequences from a list of documents.

    Args:
        documents: each ``(time,)`` int64 tokens or ``(time, obs)`` float.
        features: optional lookup ``i -> (features (time, feature), ahead (time,))`` of
            document ``i`` (e.g. a frozen-LM feature cache). Without it the batch carries its
            observations as ``reader_input`` for a trainable reader.
        generator: the random source (its state is saved in checkpoints).
    """

    def __init__(
        self,
        documents: Sequence[torch.Tensor],
        features: FeatureLookup | None = None,
        generator: torch.Generator | None = None,
    ):
        self.documents = list(documents)
        if not self.documents:
            raise ValueError("no documents to sample from")
        lengths = torch.tensor([len(d) for d in self.documents], dtype=torch.float64)
        if bool((lengths < 1).all()):
            raise ValueError("every document is empty")
        self.lengths = lengths
        self.features = features
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def sample(self, batch_size: int, length: int) -> ChainBatch:
        """``batch_size`` subsequences of ``length`` tokens (shorter where a document is)."""
        # documents are drawn in proportion to their length, so every token is equally likely
        docs = torch.multinomial(self.lengths, batch_size, replacement=True, generator=self.generator)
        seqs, feats = [], []
        for d in docs.tolist():
            n = len(self.documents[d])
            take = min(length, n)
            a = int(torch.randint(0, n - take + 1, (1,), generator=self.generator))
            seqs.append(self.documents[d][a : a + take])
            if self.features is not None:
                f, _ = self.features(d)
                if f.shape[0] != n:
                    raise ValueError(f"the feature lookup gave {f.shape[0]} positions for document {d} of {n} tokens")
                feats.append(f[a : a + take])
        return sampled_batch(seqs, feats if self.features is not None else None)


class MemmapSampler:
    """Random contiguous subsequences straight from a :class:`vmt.data.memmap.MemmapCorpus`.

    The same contract as :class:`SubsequenceSampler` (documents drawn in proportion to their
    length, a uniform start inside each), without ever holding the corpus in memory: the
    corpus draws the token slices (:meth:`~vmt.data.memmap.MemmapCorpus.sample_subsequences`),
    this sampler makes them a batch.

    Args:
        corpus: the corpus.
        features: optional lookup ``i -> (features (time, feature), ahead (time,))``; a lookup
            with a ``slice(i, start, stop)`` method is read only where sampled.
        generator: the random source.
    """

    def __init__(self, corpus: MemmapCorpus, features=None, generator: torch.Generator | None = None):
        self.corpus = corpus
        self.features = features
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def sample(self, batch_size: int, length: int) -> ChainBatch:
        """``batch_size`` subsequences of ``length`` tokens (shorter where a document is).

        Returns a batch with ``obs`` ``(batch, time)`` int64 and either ``features``
        ``(batch, time, feature)`` or ``reader_input`` for a trainable reader.
        """
        seqs, feats = self.corpus.sample_subsequences(batch_size, length, self.generator, self.features)
        return sampled_batch(seqs, feats)
