"""Tokenised corpora on disk as memory-mapped token arrays with document boundaries.

A corpus folder holds::

    tokens.bin     every document's token ids back to back, little-endian uint16 (vocabularies
                   up to 65,536 ids) or uint32
    offsets.npy    (documents + 1,) int64: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``
    header.json    format, dtype, vocabulary size, tokenizer name, counts, sources (with a
                   sha256 of each input's content), fingerprint, and checksums: of
                   offsets.npy, and of tokens.bin per block of ``BLOCK_BYTES``

:func:`build_memmap_corpus` streams the input text files line by line, so memory stays bounded
by one document (or one chunk of a file) whatever the corpus size. It is resumable: the token
and offset files grow as ``*.partial`` files, and after every flushed chunk a small progress
record (input file, byte position, partial file sizes) is replaced atomically; a re-run
truncates the partial files to the last record and reads on from there. ``header.json`` is
written last, so a folder with a header is complete.

:class:`MemmapCorpus` opens such a folder without reading it: documents are sliced from the
memory map on demand. :meth:`MemmapCorpus.sample_subsequences` draws random subsequences
straight from the map (as token tensors: this module builds no model batches;
:class:`vmt.inference.subsequences.MemmapSampler` turns them into training batches), and
:attr:`MemmapCorpus.documents` is a lazy ``Sequence[Tensor]`` for code that takes a list of
documents.

Corruption is never used: opening checks the file sizes, that the offsets rise from 0 and
their checksum (cheap), and every block of ``tokens.bin`` is checked against its sha256 the
first time a document in it is read (:meth:`MemmapCorpus.verify` checks them all). A build
into a folder whose corpus is corrupt rebuilds it.

The corpus :attr:`~MemmapCorpus.fingerprint` equals that of the same documents as a
:class:`vmt.data.corpus.TokenizedCorpus`, so feature caches keyed on it agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vmt.atomic import atomic_write
from vmt.data.corpus import tokenizer_name, tokenizer_vocab_size

logger = logging.getLogger(__name__)

__all__ = [
    "DocumentView",
    "MemmapCorpus",
    "build_memmap_corpus",
]

_FORMAT = 1
BLOCK_BYTES = 1 << 24  # tokens.bin is checksummed in blocks of 16 MiB
Split = Literal["blank", "line", "file"]


def _atomic_json(path: Path, data: dict) -> None:
    with atomic_write(path, "w", fsync=True) as fh:
        json.dump(data, fh, indent=1)


def _token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's contents, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _sources(paths: list[Path]) -> list[dict]:
    """Path, size and content hash of each input (an input edited to the same size differs)."""
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in paths]


def _block_hashes(path: Path, block: int = BLOCK_BYTES) -> list[str]:
    """sha256 of each ``block`` bytes of ``path``, read in 1 MiB pieces (bounded memory)."""
    out, size = [], path.stat().st_size
    with open(path, "rb") as fh:
        for start in range(0, size, block):
            h, left = hashlib.sha256(), min(block, size - start)
            while left > 0:
                piece = fh.read(min(left, 1 << 20))
                h.update(piece)
                left -= len(piece)
            out.append(h.hexdigest())
    return out


def _offsets_sha256(offsets: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(offsets, dtype="<i8").tobytes()).hexdigest()


def _segments(fh, split: Split, chunk_chars: int) -> Iterator[tuple[str, bool, int]]:
    """``(text, ends_document, byte_position_after)`` pieces of one binary file handle.

    ``blank``: documents are separated by blank lines; ``line``: every non-empty line is a
    document; ``file``: the whole file is one document, given in chunks of about
    ``chunk_chars`` characters cut at line ends.
    """
    pending: list[str] = []
    size = 0
    for raw in iter(fh.readline, b""):
        line = raw.decode("utf-8")
        pos = fh.tell()
        if split == "line":
            text = line.rstrip("\r\n")
            if text.strip():
                yield text, True, pos
            continue
        if split == "blank" and not line.strip():
            if pending:
                yield "".join(pending).rstrip("\r\n"), True, pos
                pending, size = [], 0
            continue
        pending.append(line)
        size += len(line)
        if split == "file" and size >= chunk_chars:
            yield "".join(pending), False, pos
            pending, size = [], 0
    if pending:
        text = "".join(pending)
        yield (text.rstrip("\r\n") if split == "blank" else text), True, fh.tell()
    elif split == "file":
        yield "", True, fh.tell()


def build_memmap_corpus(
    texts: Sequence[str | Path],
    tokenizer: Any,
    out: str | Path,
    split: Split = "blank",
    min_tokens: int = 2,
    chunk_chars: int = 1 << 20,
    flush_tokens: int = 1 << 20,
    progress: bool = True,
    encoding: str = "utf-8",
) -> MemmapCorpus:
    """Tokenise text files into a memory-mapped corpus folder (or finish an interrupted build).

    Args:
        texts: input text files, read in the order given.
        tokenizer: a Hugging Face tokenizer or :class:`vmt.data.corpus.CharTokenizer`
            (``encode(text, add_special_tokens=False)``); special tokens are not added.
        out: the corpus folder.
        split: how documents are delimited: ``"blank"`` (blank lines), ``"line"`` (one per
            line) or ``"file"`` (one per file, tokenised in chunks of ``chunk_chars``
            characters cut at line ends).
        min_tokens: documents with fewer tokens are dropped (a Markov chain needs two).
        chunk_chars: chunk size for ``split="file"``.
        flush_tokens: tokens buffered before they are written and the progress recorded.
        progress: show a tqdm bar over input bytes.
        encoding: only ``"utf-8"`` is supported (byte positions are recorded for resuming).

    Returns:
        The opened corpus.

    Raises:
        ValueError: for bad arguments, or a folder holding a different build.
        FileNotFoundError: if an input is not a file.
    """
    paths = _check_build_args(texts, out, split, min_tokens, chunk_chars, flush_tokens, encoding)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _build_plan(paths, tokenizer, split, min_tokens, chunk_chars)
    built = _existing_corpus(out, plan)
    if built is not None:
        return built
    state = _start_or_resume(out, plan)
    dtype = np.dtype(plan["dtype"])
    with _PartialFiles(out, plan, state, dtype) as files:
        _tokenise(files, paths, tokenizer, plan, flush_tokens, progress)
    return _finalise(out, plan, files.n_docs, files.n_tokens, dtype)


_BUILD_FILES = ("header.json", "tokens.bin", "offsets.npy", "progress.json")


def _check_build_args(texts, out, split, min_tokens, chunk_chars, flush_tokens, encoding) -> list[Path]:
    """The input paths, after checking every argument of :func:`build_memmap_corpus`."""
    if encoding.lower().replace("-", "") != "utf8":
        raise ValueError(f"only utf-8 input is supported, got encoding={encoding!r}")
    if split not in ("blank", "line", "file"):
        raise ValueError(f"split must be 'blank', 'line' or 'file', got {split!r}")
    if min_tokens < 1 or chunk_chars < 1 or flush_tokens < 1:
        raise ValueError(
            f"min_tokens, chunk_chars and flush_tokens must be >= 1, got "
            f"{min_tokens}, {chunk_chars}, {flush_tokens}"
        )
    paths = [Path(t) for t in texts]
    if not paths:
        raise ValueError("no input text files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no text file at {p}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"corpus folder {out} is an existing file; give a folder path")
    return paths


def _build_plan(paths: list[Path], tokenizer: Any, split: Split, min_tokens: int, chunk_chars: int) -> dict:
    """What a build is made of (stored in the header and the progress record)."""
    vocab_size = tokenizer_vocab_size(tokenizer)
    return {
        "format": _FORMAT,
        "tokenizer_name": tokenizer_name(tokenizer),
        "vocab_size": vocab_size,
        "dtype": _token_dtype(vocab_size).str,
        "split": split,
        "min_tokens": min_tokens,
        "chunk_chars": chunk_chars,
        "sources": _sources(paths),
    }


def _existing_corpus(out: Path, plan: dict) -> MemmapCorpus | None:
    """The corpus already built in ``out`` for ``plan`` (``None``: build it). An old or corrupt
    build is removed; a complete build of another plan is a ``ValueError``."""
    header_path = out / "header.json"
    if header_path.is_file():
        try:
            header = json.loads(header_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if isinstance(header, dict) and any("sha256" not in src for src in header.get("sources", [])):
            logger.warning("corpus %s was built without content hashes of its inputs; rebuilding it", out)
            for name in _BUILD_FILES:
                (out / name).unlink(missing_ok=True)
        elif isinstance(header, dict):
            diff = sorted(k for k in plan if header.get(k) != plan[k])
            if diff:
                raise ValueError(
                    f"corpus folder {out} holds a different build ({', '.join(diff)} differ); "
                    "use another folder or delete it"
                )
    if header_path.is_file():
        try:
            corpus = MemmapCorpus(out)
            corpus.verify()
            logger.info("corpus %s is already built", out)
            return corpus
        except (ValueError, OSError) as err:
            logger.warning("corpus %s is corrupt (%s); rebuilding it", out, err)
            for name in _BUILD_FILES:
                (out / name).unlink(missing_ok=True)
    return None


def _start_or_resume(out: Path, plan: dict) -> dict:
    """The progress state of an unfinished build of ``plan`` in ``out``, or a fresh one (then
    the partial files are removed and the record written)."""
    progress_path = out / "progress.json"
    state = {"file": 0, "byte": 0, "tokens": 0, "documents": 0, "open": 0}
    if progress_path.is_file():
        old = json.loads(progress_path.read_text())
        if old.get("plan") != plan:
            raise ValueError(
                f"corpus folder {out} holds an unfinished build of different inputs or settings; "
                "delete it to start again"
            )
        state = old["state"]
        logger.info("resuming corpus build in %s at file %d, byte %d", out, state["file"], state["byte"])
    else:
        for p in (out / "tokens.bin.partial", out / "offsets.bin.partial"):
            p.unlink(missing_ok=True)
        _atomic_json(progress_path, {"plan": plan, "state": state})
    return state


class _PartialFiles:
    """The growing ``tokens.bin.partial`` and ``offsets.bin.partial`` of a build, with the
    tokens buffered since the last write, the document ends since the last flush, and the
    counts (``n_tokens``, ``n_docs``, ``open_len``: tokens of the document under way).

    Opening truncates both files to the last recorded flush (what was written after it is
    dropped); :meth:`flush` writes everything and records the progress.
    """

    def __init__(self, out: Path, plan: dict, state: dict, dtype: np.dtype) -> None:
        self.out, self.plan, self.state, self.dtype = out, plan, state, dtype
        self.buffer: list[np.ndarray] = []
        self.ends: list[int] = []
        self.buffered = 0
        self.n_tokens, self.n_docs, self.open_len = state["tokens"], state["documents"], state["open"]

    def __enter__(self) -> _PartialFiles:
        self.tf = open(self.out / "tokens.bin.partial", "ab")  # closed in __exit__
        self.of = open(self.out / "offsets.bin.partial", "ab")
        # drop whatever was written after the last recorded flush
        self.tf.truncate(self.state["tokens"] * self.dtype.itemsize)
        self.of.truncate(self.state["documents"] * 8)
        self.tf.seek(0, os.SEEK_END)
        self.of.seek(0, os.SEEK_END)
        return self

    def __exit__(self, *exc) -> None:
        self.of.close()
        self.tf.close()

    def add(self, ids: np.ndarray, ends_document: bool, min_tokens: int) -> None:
        """Buffer the ``(tokens,)`` ids of a piece; at a document's end keep it, or take it
        back out when it has fewer than ``min_tokens`` tokens."""
        self.buffer.append(ids.astype(self.dtype))
        self.buffered += ids.size
        self.n_tokens += ids.size
        self.open_len += ids.size
        if not ends_document:
            return
        if self.open_len >= min_tokens:
            self.ends.append(self.n_tokens)
            self.n_docs += 1
        else:  # too short: take its tokens back out
            self.n_tokens -= self.open_len
            self.write_out()
            self.tf.flush()
            self.tf.truncate(self.n_tokens * self.dtype.itemsize)
            self.tf.seek(0, os.SEEK_END)
        self.open_len = 0

    def write_out(self) -> None:
        """Write the buffered tokens (no progress is recorded)."""
        for arr in self.buffer:
            self.tf.write(arr.tobytes())
        self.buffer, self.buffered = [], 0

    def flush(self, file_index: int, byte: int) -> None:
        """Write and sync both files and record the progress: input ``file_index`` at ``byte``."""
        self.write_out()
        self.of.write(np.asarray(self.ends, dtype="<i8").tobytes())
        self.tf.flush()
        self.of.flush()
        os.fsync(self.tf.fileno())
        os.fsync(self.of.fileno())
        self.state.update(file=file_index, byte=byte, tokens=self.n_tokens, documents=self.n_docs,
                          open=self.open_len)
        _atomic_json(self.out / "progress.json", {"plan": self.plan, "state": self.state})
        self.ends = []


def _tokenise(files: _PartialFiles, paths: list[Path], tokenizer: Any, plan: dict, flush_tokens: int,
              progress: bool) -> None:
    """Read the inputs from the recorded position on, tokenise every piece into ``files``."""
    from tqdm.auto import tqdm

    state, vocab_size = files.state, plan["vocab_size"]
    total_bytes = sum(p.stat().st_size for p in paths)
    done_bytes = sum(p.stat().st_size for p in paths[: state["file"]]) + state["byte"]
    bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True,
               desc="tokenise", disable=not progress)
    try:
        for fi in range(state["file"], len(paths)):
            start_byte = state["byte"] if fi == state["file"] else 0
            with open(paths[fi], "rb") as fh:
                fh.seek(start_byte)
                last = start_byte
                for text, ends_doc, pos in _segments(fh, plan["split"], plan["chunk_chars"]):
                    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
                    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                        raise ValueError(
                            f"tokenizer gave ids in [{int(ids.min())}, {int(ids.max())}], "
                            f"outside [0, {vocab_size}) in {paths[fi]}"
                        )
                    files.add(ids, ends_doc, plan["min_tokens"])
                    bar.update(pos - last)
                    last = pos
                    # progress is recorded only between documents, so a resumed build
                    # never splits one; a long document's tokens still go to disk
                    if files.buffered >= flush_tokens:
                        if files.open_len == 0:
                            files.flush(fi, pos)
                        else:
                            files.write_out()
            if files.open_len == 0:
                files.flush(fi + 1, 0)
    finally:
        bar.close()
    if files.open_len:
        raise RuntimeError("internal error: an unfinished document at the end of the input")


def _finalise(out: Path, plan: dict, n_docs: int, n_tokens: int, dtype: np.dtype) -> MemmapCorpus:
    if n_docs == 0:
        raise ValueError(f"no document of the inputs has {plan['min_tokens']} or more tokens")
    ends = np.fromfile(out / "offsets.bin.partial", dtype="<i8")
    if ends.size != n_docs or int(ends[-1]) != n_tokens:
        raise RuntimeError(f"corpus build in {out} is inconsistent; delete the folder and rebuild")
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), ends])
    fingerprint = _fingerprint(out / "tokens.bin.partial", dtype, offsets, plan["tokenizer_name"],
                               plan["vocab_size"])
    with atomic_write(out / "offsets.npy") as fh:
        np.save(fh, offsets)
    os.replace(out / "tokens.bin.partial", out / "tokens.bin")
    header = {**plan, "num_documents": n_docs, "num_tokens": n_tokens, "fingerprint": fingerprint,
              "offsets_sha256": _offsets_sha256(offsets), "block_bytes": BLOCK_BYTES,
              "block_sha256": _block_hashes(out / "tokens.bin")}
    _atomic_json(out / "header.json", header)
    (out / "offsets.bin.partial").unlink(missing_ok=True)
    (out / "progress.json").unlink(missing_ok=True)
    logger.info("built corpus %s: %d documents, %d tokens", out, n_docs, n_tokens)
    return MemmapCorpus(out)


def _fingerprint(path: Path, dtype: np.dtype, offsets: np.ndarray, name: str, vocab_size: int) -> str:
    """The :attr:`vmt.data.corpus.TokenizedCorpus.fingerprint` of the documents, streamed.

    The token file is read sequentially in pieces (not mapped), so the pass keeps neither the
    corpus nor its pages in this process's memory.
    """
    h = hashlib.sha256()
    h.update(f"tokenizer={name}\nvocab={vocab_size}\n".encode())
    h.update(f"documents={len(offsets) - 1}\n".encode())
    step = 1 << 20
    with open(path, "rb") as fh:
        for i in range(len(offsets) - 1):
            n = int(offsets[i + 1] - offsets[i])
            h.update(f"{n}:".encode())
            while n > 0:
                take = min(n, step)
                piece = np.fromfile(fh, dtype=dtype, count=take)
                if piece.size != take:
                    raise RuntimeError(f"token file {path} is shorter than its offsets say")
                h.update(piece.astype("<i8").tobytes())
                n -= take
    return h.hexdigest()


class DocumentView(Sequence):
    """A lazy ``Sequence[Tensor]``: item ``i`` is document ``i`` as a ``(time,)`` int64 copy."""

    def __init__(self, corpus: MemmapCorpus) -> None:
        self._corpus = corpus

    def __len__(self) -> int:
        return len(self._corpus)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._corpus.document(j) for j in range(*i.indices(len(self)))]
        return self._corpus.document(i)


class MemmapCorpus:
    """A built corpus folder, memory-mapped (nothing is read until a document is asked for).

    Offers what :class:`vmt.data.corpus.TokenizedCorpus` offers to the feature caches
    (``name``, ``documents``, ``lengths``, ``fingerprint``, ``vocab_size``, ``len``).
    """

    def __init__(self, directory: str | Path, name: str | None = None) -> None:
        self.directory = Path(directory)
        header_path = self.directory / "header.json"
        if not header_path.is_file():
            raise FileNotFoundError(
                f"no built corpus at {self.directory} (header.json missing; an unfinished build "
                "is completed by running the build again)"
            )
        corrupt = f"corpus at {self.directory} is corrupt"
        rebuild = "delete the folder and run `vmt data build` again"
        try:
            self.header: dict = json.loads(header_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{corrupt}: header.json is not valid JSON ({err}); {rebuild}") from None
        if not isinstance(self.header, dict) or self.header.get("format") != _FORMAT:
            raise ValueError(f"corpus at {self.directory} has an unknown format")
        self.name = name or self.directory.name
        self.vocab_size = int(self.header["vocab_size"])
        self.tokenizer_name = str(self.header["tokenizer_name"])
        self.fingerprint = str(self.header["fingerprint"])
        try:
            self.offsets = np.load(self.directory / "offsets.npy", mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{corrupt}: offsets.npy is unreadable ({err}); {rebuild}") from None
        n = int(self.header["num_tokens"])
        dtype = np.dtype(self.header["dtype"])
        if self.offsets.ndim != 1 or len(self.offsets) != int(self.header["num_documents"]) + 1 \
                or int(self.offsets[-1]) != n or int(self.offsets[0]) != 0:
            raise ValueError(f"{corrupt}: offsets.npy disagrees with header.json; {rebuild}")
        if "offsets_sha256" in self.header and _offsets_sha256(self.offsets) != self.header["offsets_sha256"]:
            raise ValueError(f"{corrupt}: offsets.npy does not match its checksum; {rebuild}")
        if bool(np.any(np.diff(self.offsets) < 0)):
            raise ValueError(f"{corrupt}: offsets.npy gives negative document lengths; {rebuild}")
        size = (self.directory / "tokens.bin").stat().st_size
        if size != n * dtype.itemsize:
            raise ValueError(f"{corrupt}: tokens.bin has {size} bytes, the header says "
                             f"{n * dtype.itemsize}; {rebuild}")
        self.tokens = np.memmap(self.directory / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
        self._blocks = self.header.get("block_sha256")
        self._block_bytes = int(self.header.get("block_bytes", BLOCK_BYTES))
        self._verified: set[int] = set()
        self.documents = DocumentView(self)

    def _check_tokens(self, a: int, b: int) -> None:
        """Verify (once per process) the checksum of every block holding tokens ``[a, b)``."""
        if not self._blocks or b <= a:
            return
        item = self.tokens.dtype.itemsize
        size = self.num_tokens * item
        for k in range(a * item // self._block_bytes, (b * item - 1) // self._block_bytes + 1):
            if k in self._verified:
                continue
            # read through the file, not the map: checking leaves no pages resident here
            h = hashlib.sha256()
            with open(self.directory / "tokens.bin", "rb") as fh:
                fh.seek(k * self._block_bytes)
                left = min(self._block_bytes, size - k * self._block_bytes)
                while left > 0:
                    piece = fh.read(min(left, 1 << 20))
                    if not piece:
                        break
                    h.update(piece)
                    left -= len(piece)
            if k >= len(self._blocks) or h.hexdigest() != self._blocks[k]:
                raise ValueError(f"corpus at {self.directory} is corrupt: block {k} of tokens.bin does not "
                                 "match its checksum; delete the folder and run `vmt data build` again")
            self._verified.add(k)

    def verify(self) -> None:
        """Check every block of ``tokens.bin`` against its checksum (reads the whole file)."""
        self._check_tokens(0, self.num_tokens)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.header["num_tokens"])

    @property
    def length_array(self) -> np.ndarray:
        """``(documents,)`` int64 document lengths."""
        return np.diff(self.offsets)

    @property
    def lengths(self) -> list[int]:
        """Number of tokens of each document (a list; see :attr:`length_array` for numpy)."""
        return self.length_array.tolist()

    def _bounds(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a corpus of {n} documents")
        i %= n
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def document(self, i: int) -> torch.Tensor:
        """Document ``i``: ``(time,)`` int64 (a copy out of the map)."""
        a, b = self._bounds(i)
        self._check_tokens(a, b)
        return torch.from_numpy(self.tokens[a:b].astype(np.int64))

    def slice(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Tokens ``[start, stop)`` of document ``i``: ``(stop - start,)`` int64."""
        a, b = self._bounds(i)
        if not 0 <= start < stop <= b - a:
            raise ValueError(f"slice [{start}, {stop}) is not inside document {i} of {b - a} tokens")
        self._check_tokens(a + start, a + stop)
        return torch.from_numpy(self.tokens[a + start : a + stop].astype(np.int64))

    def sample_documents(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``(count,)`` int64 document indices drawn in proportion to their length."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        # a uniform token position falls in document i with probability length_i / total
        pos = torch.randint(0, self.num_tokens, (count,), generator=generator).numpy()
        return torch.from_numpy(np.searchsorted(self.offsets, pos, side="right") - 1).long()

    def sample_subsequences(
        self, batch_size: int, length: int, generator: torch.Generator, features=None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``batch_size`` random contiguous subsequences of ``length`` tokens (shorter where a
        document is): documents drawn in proportion to their length, a uniform start inside each.

        Args:
            batch_size: how many subsequences.
            length: the longest subsequence.
            generator: the random source.
            features: optional lookup ``i -> (features (time, feature), ahead (time,))``; a
                lookup with a ``slice(i, start, stop)`` method is read only where sampled.

        Returns:
            ``(sequences, features)``: ``batch_size`` tensors ``(time_b,)`` int64, and the
            matching ``(time_b, feature)`` slices (``None`` without a lookup).
        """
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be >= 1, got {batch_size}, {length}")
        docs = self.sample_documents(batch_size, generator)
        seqs, feats = [], []
        for d in docs.tolist():
            n = int(self.offsets[d + 1] - self.offsets[d])
            take = min(length, n)
            a = int(torch.randint(0, n - take + 1, (1,), generator=generator))
            seqs.append(self.slice(d, a, a + take))
            if features is not None:
                if hasattr(features, "slice"):
                    f, _ = features.slice(d, a, a + take)
                else:
                    f = features(d)[0][a : a + take]
                feats.append(f)
        return seqs, (feats if features is not None else None)

    def __repr__(self) -> str:
        return (
            f"MemmapCorpus({str(self.directory)!r}, documents={len(self)}, "
            f"num_tokens={self.num_tokens}, vocab_size={self.vocab_size})"
        )
