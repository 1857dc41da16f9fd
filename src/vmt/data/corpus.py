"""Text corpora as tokenised documents.

A :class:`TokenizedCorpus` is an immutable tuple of documents, each a ``(time,)`` int64 tensor
of token ids, together with the tokenizer that produced them. Its :attr:`fingerprint` is a
sha256 of the tokenizer name, the vocabulary size and every token id, so on-disk caches built
from it (see :mod:`vmt.encoders.cache`) can be keyed on it and checked against it.

The default corpus is the reference prose that every CPython ships in ``pydoc_data.topics``
(79 documents, about 465 KB of English).
"""

from __future__ import annotations

import hashlib
import logging
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CharTokenizer",
    "TokenizedCorpus",
    "Tokenizer",
    "default_corpus",
    "pydoc_texts",
    "pydoc_topics",
    "read_text_files",
    "tokenize",
]


class Tokenizer(Protocol):
    """What :func:`tokenize` needs from a tokenizer (Hugging Face ones qualify)."""

    name_or_path: str

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def pydoc_topics() -> list[tuple[str, str]]:
    """``(topic, text)`` pairs of ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def pydoc_texts() -> list[str]:
    """The documents of ``pydoc_data.topics``, one per topic, sorted by topic name."""
    return [text for _, text in pydoc_topics()]


def read_text_files(paths: Iterable[str | Path], encoding: str = "utf-8") -> list[str]:
    """Read each file as one document.

    Args:
        paths: text files, read in the order given.
        encoding: text encoding of the files.

    Returns:
        One string per file.

    Raises:
        FileNotFoundError: if a path is not a file.
        ValueError: if ``paths`` is empty or a file is not valid text in ``encoding``.
    """
    texts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no text file at {path}")
        try:
            texts.append(path.read_text(encoding=encoding))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not valid {encoding} text (byte {err.start}: {err.reason})") from None
    if not texts:
        raise ValueError("read_text_files got no paths")
    return texts


class CharTokenizer:
    """A character-level tokenizer with a fixed alphabet (for tests and toy corpora).

    Id 0 is the unknown character; the characters of ``alphabet`` get ids 1, 2, ... in order.
    ``decode`` writes the unknown id as ``unknown``.

    Args:
        alphabet: the known characters (duplicates are an error). Defaults to printable ASCII.
        unknown: the character ``decode`` writes for id 0.
    """

    def __init__(self, alphabet: str | None = None, unknown: str = "\ufffd") -> None:
        alphabet = string.printable if alphabet is None else alphabet
        if not alphabet:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has repeated characters")
        self.alphabet = alphabet
        self.unknown = unknown
        self._ids = {c: i + 1 for i, c in enumerate(alphabet)}
        digest = hashlib.sha256(alphabet.encode("utf-8")).hexdigest()[:12]
        self.name_or_path = f"char-{len(alphabet)}-{digest}"

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """A tokenizer whose alphabet is every character of ``texts``, sorted."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls("".join(sorted(chars)))

    @property
    def vocab_size(self) -> int:
        """Number of ids, including the unknown id 0."""
        return len(self.alphabet) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of the characters of ``text`` (0 for characters outside the alphabet)."""
        del add_special_tokens  # no special tokens; accepted for Hugging Face compatibility
        return [self._ids.get(c, 0) for c in text]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """The text of ``ids``; raises ``ValueError`` for ids outside ``[0, vocab_size)``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
            out.append(self.unknown if i == 0 else self.alphabet[i - 1])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, name_or_path={self.name_or_path!r})"


@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Tokenised documents and the tokenizer they came from.

    Attributes:
        name: a label for logs and reports (not part of the fingerprint).
        documents: each a ``(time,)`` int64 tensor of ids in ``[0, vocab_size)``, time >= 1.
        vocab_size: number of token ids of the tokenizer.
        tokenizer_name: identifies the tokenizer (part of the fingerprint).
    """

    name: str
    documents: tuple[torch.Tensor, ...]
    vocab_size: int
    tokenizer_name: str

    def __post_init__(self) -> None:
        if not isinstance(self.documents, tuple):
            object.__setattr__(self, "documents", tuple(self.documents))
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not self.documents:
            raise ValueError(f"corpus {self.name!r} has no documents")
        for i, doc in enumerate(self.documents):
            if not isinstance(doc, torch.Tensor) or doc.dtype != torch.int64 or doc.dim() != 1:
                what = (
                    f"{doc.dtype} tensor of shape {tuple(doc.shape)}"
                    if isinstance(doc, torch.Tensor)
                    else type(doc).__name__
                )
                raise ValueError(f"document {i} must be a (time,) int64 tensor, got {what}")
            if doc.numel() == 0:
                raise ValueError(f"document {i} of corpus {self.name!r} is empty")
            lo, hi = int(doc.min()), int(doc.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"document {i} has token ids in [{lo}, {hi}], outside [0, {self.vocab_size})"
                )

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def lengths(self) -> list[int]:
        """Number of tokens of each document."""
        return [int(d.numel()) for d in self.documents]

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all documents."""
        return sum(self.lengths)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of the tokenizer name, the vocabulary size and the token ids.

        Document boundaries are part of it; the corpus ``name`` is not. Stable across runs and
        machines (ids are hashed as little-endian int64).
        """
        h = hashlib.sha256()
        h.update(f"tokenizer={self.tokenizer_name}\nvocab={self.vocab_size}\n".encode())
        h.update(f"documents={len(self.documents)}\n".encode())
        for doc in self.documents:
            h.update(f"{doc.numel()}:".encode())
            h.update(np.ascontiguousarray(doc.numpy(), dtype="<i8").tobytes())
        return h.hexdigest()

    def _with(self, name: str, documents: Sequence[torch.Tensor]) -> TokenizedCorpus:
        return TokenizedCorpus(name, tuple(documents), self.vocab_size, self.tokenizer_name)

    def split(
        self, valid_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
    ) -> tuple[TokenizedCorpus, TokenizedCorpus, TokenizedCorpus]:
        """Split by document into ``(train, valid, test)``.

        Documents with the same tokens are kept once (a logged warning says how many copies
        were dropped), so no held-out document is a copy of a training one. The documents are
        shuffled with ``seed``; valid and test get
        ``max(1, round(fraction * n))`` documents each, train the rest. Within each split the
        documents keep their original order. Deterministic for a given seed.

        Raises:
            ValueError: if a fraction is outside ``(0, 1)`` or a split would be empty.
        """
        for label, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < f < 1.0:
                raise ValueError(f"{label} must be in (0, 1), got {f}")
        unique = self.deduplicated()
        if unique is not self:
            return unique.split(valid_fraction, test_fraction, seed)
        n = len(self.documents)
        n_valid = max(1, round(valid_fraction * n))
        n_test = max(1, round(test_fraction * n))
        n_train = n - n_valid - n_test
        if n_train < 1:
            raise ValueError(
                f"cannot split {n} documents into non-empty train/valid/test with "
                f"valid_fraction={valid_fraction}, test_fraction={test_fraction} "
                f"({n_train} train, {n_valid} valid, {n_test} test)"
            )
        perm = np.random.default_rng(seed).permutation(n)
        parts = (perm[:n_train], perm[n_train : n_train + n_valid], perm[n_train + n_valid :])
        names = ("train", "valid", "test")
        train, valid, test = (
            self._with(f"{self.name}/{label}", [self.documents[i] for i in sorted(idx.tolist())])
            for label, idx in zip(names, parts, strict=True)
        )
        return train, valid, test

    def deduplicated(self) -> TokenizedCorpus:
        """The corpus with each distinct document once (first occurrence, order kept); ``self``
        if there are no copies, else a warning is logged."""
        seen: set[bytes] = set()
        keep = []
        for doc in self.documents:
            key = hashlib.sha256(np.ascontiguousarray(doc.numpy(), dtype="<i8").tobytes()).digest()
            if key not in seen:
                seen.add(key)
                keep.append(doc)
        if len(keep) == len(self.documents):
            return self
        logger.warning("corpus %r: %d of %d documents are copies of others and were dropped before splitting",
                       self.name, len(self.documents) - len(keep), len(self.documents))
        return self._with(self.name, keep)

    def truncate(self, max_tokens: int) -> TokenizedCorpus:
        """The leading documents holding at most ``max_tokens`` tokens, the last one clipped."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        docs: list[torch.Tensor] = []
        left = max_tokens
        for doc in self.documents:
            if left <= 0:
                break
            docs.append(doc[:left].clone() if doc.numel() > left else doc)
            left -= int(docs[-1].numel())
        return self._with(f"{self.name}[:{max_tokens}]", docs)

    def __repr__(self) -> str:
        return (
            f"TokenizedCorpus(name={self.name!r}, documents={len(self.documents)}, "
            f"num_tokens={self.num_tokens}, vocab_size={self.vocab_size}, "
            f"tokenizer_name={self.tokenizer_name!r})"
        )


def tokenizer_name(tokenizer: Any) -> str:
    """A short, machine-independent name for a tokenizer.

    A local folder (as Hugging Face records for models loaded from disk) is reduced to its
    last component, so the name does not depend on where the cache lives.
    """
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path.name or name
    return name


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of ids a tokenizer can produce (``len(tokenizer)`` counts added tokens)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(tokenizer.vocab_size)


def tokenize(texts: Sequence[str], tokenizer: Any, name: str = "corpus") -> TokenizedCorpus:
    """Tokenise each text into one document.

    Special tokens are not added. Documents shorter than 2 tokens are dropped with a
    logged warning (a Markov model needs at least one transition).

    Args:
        texts: one string per document.
        tokenizer: a Hugging Face tokenizer or a :class:`CharTokenizer`.
        name: label of the corpus.

    Raises:
        ValueError: if no document has 2 or more tokens.
    """
    if isinstance(texts, str):
        raise ValueError("tokenize expects a sequence of texts, got a single str")
    vocab_size = tokenizer_vocab_size(tokenizer)
    docs = []
    dropped = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) < 2:
            dropped.append(i)
            continue
        docs.append(torch.tensor(ids, dtype=torch.int64))
    if dropped:
        logger.warning(
            "corpus %r: dropped %d of %d documents shorter than 2 tokens (indices %s)",
            name,
            len(dropped),
            len(texts),
            dropped[:10],
        )
    if not docs:
        raise ValueError(
            f"corpus {name!r}: none of the {len(texts)} texts has 2 or more tokens "
            "(empty or one-token texts cannot form a corpus)"
        )
    return TokenizedCorpus(name, tuple(docs), vocab_size, tokenizer_name(tokenizer))


def default_corpus(tokenizer: Any) -> TokenizedCorpus:
    """The ``pydoc_data.topics`` documents tokenised with ``tokenizer``."""
    return tokenize(pydoc_texts(), tokenizer, name="pydoc")
