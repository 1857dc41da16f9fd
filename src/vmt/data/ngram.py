"""Count-based language models over token ids: the reference rows of text benchmarks.

* :class:`AddHalfUnigram`: ``p(w) = (c(w) + 1/2) / (N + V/2)`` (add-½, Jeffreys prior).
* :class:`KneserNey`: interpolated Kneser-Ney of any order ``n`` (Chen & Goodman 1999, one
  absolute discount per order)::

      p_n(w | h) = max(c(h w) - D_n, 0) / c(h .) + D_n N1+(h .) / c(h .) * p_{n-1}(w | h')

  where ``h'`` drops the oldest token of ``h``; the highest order uses raw counts ``c``, every
  lower order the continuation counts ``N1+(. g)`` (distinct tokens seen before the n-gram
  ``g``); the lowest order interpolates with the uniform distribution over the whole
  vocabulary, so every id gets a positive probability and each conditional sums to 1 over
  the vocabulary. A context never seen at an order falls through to the order below. The
  discounts default to ``D = n1 / (n1 + 2 n2)`` from the counts-of-counts of each order.

Documents are scored from their first token: each is padded on the left with ``n - 1``
beginning-of-document symbols (an id outside the vocabulary that is never predicted).
Counting is vectorised: an n-gram is one int64 key in base ``vocab + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_array(doc) -> np.ndarray:
    if isinstance(doc, torch.Tensor):
        doc = doc.detach().cpu().numpy()
    arr = np.asarray(doc, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"a document must be a (time,) array of token ids, got shape {arr.shape}")
    return arr


def _check_ids(docs: list[np.ndarray], vocab_size: int) -> None:
    for i, d in enumerate(docs):
        if d.size and (int(d.min()) < 0 or int(d.max()) >= vocab_size):
            raise ValueError(
                f"document {i} has token ids in [{int(d.min())}, {int(d.max())}], outside "
                f"[0, {vocab_size})"
            )


class AddHalfUnigram:
    """Add-½ unigram model over ``vocab_size`` ids, fitted on ``documents``."""

    def __init__(self, documents: Sequence, vocab_size: int) -> None:
        docs = [_as_array(d) for d in documents]
        _check_ids(docs, vocab_size)
        counts = np.bincount(np.concatenate(docs), minlength=vocab_size).astype(np.float64)
        self.vocab_size = vocab_size
        self.log_probs = np.log(counts + 0.5) - np.log(counts.sum() + 0.5 * vocab_size)

    def token_log_probs(self, document) -> np.ndarray:
        """``(time,)`` log-probability of each token of ``document`` (nats)."""
        d = _as_array(document)
        _check_ids([d], self.vocab_size)
        return self.log_probs[d]

    def distribution(self, context: Sequence[int] = ()) -> np.ndarray:
        """``(vocab,)`` probabilities of the next token (the context is ignored)."""
        return np.exp(self.log_probs)


class _Table:
    """A sorted int64 key -> float64 value map with vectorised lookup (missing keys -> 0)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.values = values[order].astype(np.float64)

    @classmethod
    def count(cls, keys: np.ndarray, weights: np.ndarray | None = None) -> _Table:
        """Sum ``weights`` (default 1) per distinct key."""
        uniq, inverse = np.unique(keys, return_inverse=True)
        vals = np.bincount(inverse, weights=weights, minlength=uniq.size)
        return cls(uniq, vals)

    def get(self, query: np.ndarray) -> np.ndarray:
        if self.keys.size == 0:
            return np.zeros(query.shape, dtype=np.float64)
        pos = np.searchsorted(self.keys, query).clip(max=self.keys.size - 1)
        return np.where(self.keys[pos] == query, self.values[pos], 0.0)


class KneserNey:
    """Interpolated Kneser-Ney model of order ``order`` over ``vocab_size`` ids.

    Args:
        documents: training documents, each a ``(time,)`` sequence of ids in ``[0, vocab)``.
        vocab_size: number of ids the model spreads probability over.
        order: ``n`` (2 = bigram, 3 = trigram, ...).
        discounts: ``(D_1, ..., D_n)`` in ``(0, 1]``; default from counts-of-counts.
    """

    def __init__(self, documents: Sequence, vocab_size: int, order: int = 3,
                 discounts: Sequence[float] | None = None) -> None:
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be a positive integer, got {order!r}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if discounts is not None:
            discounts = tuple(float(d) for d in discounts)
            if len(discounts) != order or not all(0 < d <= 1 for d in discounts):
                raise ValueError(f"need {order} discounts in (0, 1], got {discounts}")
        docs = [_as_array(d) for d in documents]
        _check_ids(docs, vocab_size)
        if not any(d.size for d in docs):
            raise ValueError("no tokens to count")
        self.vocab_size = vocab_size
        self.order = order
        self.base = vocab_size + 1  # id vocab_size marks the beginning of a document
        if self.base ** order >= 2**63:
            raise ValueError(f"order {order} n-grams over {vocab_size} ids do not fit int64 keys")
        grams = [self._gram_keys(docs, k) for k in range(1, order + 1)]
        # level k (1..order): counts of k-grams; raw at the top, continuation below
        self.counts: list[_Table] = []
        self.context_total: list[_Table] = []
        self.context_types: list[_Table] = []
        self.discounts: list[float] = []
        for k in range(1, order + 1):
            if k == order:
                table = _Table.count(grams[k - 1])
            else:  # N1+(. g): distinct (k+1)-gram types ending in g
                types = np.unique(grams[k])
                table = _Table.count(types % self.base**k)
            self.counts.append(table)
            ctx = table.keys // self.base  # the (k-1)-token context of each k-gram
            self.context_total.append(_Table.count(ctx, table.values))
            self.context_types.append(_Table.count(ctx))
            if discounts is not None:
                self.discounts.append(discounts[k - 1])
            else:
                n1 = float((table.values == 1).sum())
                n2 = float((table.values == 2).sum())
                d = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5
                self.discounts.append(min(max(d, 1e-3), 1.0))

    def _padded(self, doc: np.ndarray) -> np.ndarray:
        return np.concatenate([np.full(self.order - 1, self.vocab_size, dtype=np.int64), doc])

    def _gram_keys(self, docs: list[np.ndarray], k: int) -> np.ndarray:
        """Keys of every k-gram ending at a real token (contexts padded)."""
        out = []
        for d in docs:
            if not d.size:
                continue
            p = self._padded(d)
            start = self.order - 1  # positions of real tokens in p
            key = np.zeros(d.size, dtype=np.int64)
            for j in range(k - 1, -1, -1):  # oldest token first
                key = key * self.base + p[start - j : start - j + d.size]
            out.append(key)
        return np.concatenate(out)

    def _log_probs(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``contexts``: ``(n, order - 1)`` ids (oldest first), ``targets``: ``(n,)``."""
        prob = np.full(targets.shape, 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            ctx = np.zeros(targets.shape, dtype=np.int64)
            for j in range(k - 1):  # the last k-1 tokens of the context
                ctx = ctx * self.base + contexts[:, self.order - k + j]
            key = ctx * self.base + targets
            total = self.context_total[k - 1].get(ctx)
            types = self.context_types[k - 1].get(ctx)
            count = self.counts[k - 1].get(key)
            d = self.discounts[k - 1]
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            mixed = np.maximum(count - d, 0.0) / safe + d * types / safe * prob
            prob = np.where(seen, mixed, prob)
        return np.log(prob)

    def token_log_probs(self, document) -> np.ndarray:
        """``(time,)`` log-probability of each token of ``document`` given the ones before it
        (nats; the first tokens see beginning-of-document padding)."""
        d = _as_array(document)
        _check_ids([d], self.vocab_size)
        if not d.size:
            return np.zeros(0)
        p = self._padded(d)
        n = self.order - 1
        contexts = np.stack([p[j : j + d.size] for j in range(n)], axis=1) if n else np.zeros((d.size, 0), np.int64)
        return self._log_probs(contexts, d)

    def distribution(self, context: Sequence[int] = ()) -> np.ndarray:
        """``(vocab,)`` probabilities of the next token after ``context`` (ids; shorter
        contexts are padded with the beginning-of-document symbol)."""
        ctx = [int(t) for t in context][-(self.order - 1):] if self.order > 1 else []
        if any(not 0 <= t < self.vocab_size for t in ctx):
            raise ValueError(f"context ids must lie in [0, {self.vocab_size}), got {ctx}")
        ctx = [self.vocab_size] * (self.order - 1 - len(ctx)) + ctx
        targets = np.arange(self.vocab_size, dtype=np.int64)
        contexts = np.tile(np.asarray(ctx, dtype=np.int64), (self.vocab_size, 1))
        return np.exp(self._log_probs(contexts.reshape(self.vocab_size, self.order - 1), targets))
