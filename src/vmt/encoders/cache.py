"""On-disk cache of frozen LM features for every document of a corpus.

A frozen encoder gives the same features every epoch, so they are computed once and stored.
Documents longer than the window ``W`` are read in windows; the position ``k`` takes its
feature from one window, and the number of tokens that feature has read is stored beside it
as ``ahead`` (the guide's ``T``).

Reverse direction (features read ``y_k .. y_end``): windows ``[s, min(s + W, n))`` start at
multiples of ``W/2`` (``overlap=True``) or ``W`` (``overlap=False``). With overlap the position
``k`` uses the window whose first half contains it, so every feature has at least ``W/2``
tokens of look-ahead (or all that is left of the document); without overlap it uses the window
containing it. ``ahead[k] = end - k``: the last token of a window has ``ahead = 1``.

Forward direction mirrors this with look-back: with overlap, ``k`` uses the window whose second
half contains it (the first window also serves its first half), without overlap the window
containing it; ``ahead[k] = k - start + 1`` counts the tokens read up to and including ``k``.

Two windows that end at the same token give identical reverse features on the positions they
share (a causal reader only sees tokens from ``k`` to the end), so such windows are computed
once.

Layout: ``cache_dir()/features/<key>/`` with ``meta.json`` and one safetensors file per
document (``features`` ``(time, hidden)`` in the stored dtype, ``ahead`` ``(time,)`` int64).
Every file is written to a temporary name and renamed, so an interrupted build leaves only
complete documents and the next build computes just the missing ones.

Integrity: each document file has a sidecar ``docNNNNNN.sha256`` (its size and sha256,
written after it: a document without one is not complete). Opening checks every size
(cheap); the first read of a document in a process checks its sha256. A document that fails
either check is never used: :meth:`FeatureCache.build` recomputes it, and a lookup raises a
ValueError naming it and removes its sidecar so that the next build recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from vmt.atomic import atomic_write_bytes
from vmt.data.corpus import TokenizedCorpus
from vmt.data.memmap import file_sha256
from vmt.paths import cache_dir

logger = logging.getLogger(__name__)

__all__ = ["FeatureCache", "WindowPlan", "plan_windows"]

_FORMAT = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WindowPlan:
    """One encoder call: read tokens ``[start, end)``, keep positions ``[lo, hi)``."""

    start: int
    end: int
    lo: int
    hi: int


def plan_windows(n: int, window: int, overlap: bool, direction: str) -> list[WindowPlan]:
    """The windows that cover a document of ``n`` tokens (see the module docstring).

    Every position ``0 <= k < n`` lies in exactly one ``[lo, hi)``.
    """
    if n < 1:
        raise ValueError(f"document length must be >= 1, got {n}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    step = window // 2 if overlap else window
    plans: list[WindowPlan] = []
    if direction == "reverse":
        for s in range(0, n, step):
            end = min(s + window, n)
            hi = min(s + step, n)
            if plans and plans[-1].end == end:  # same suffix read: reuse the earlier window
                prev = plans[-1]
                plans[-1] = WindowPlan(prev.start, end, prev.lo, hi)
            else:
                plans.append(WindowPlan(s, end, s, hi))
    elif direction == "forward":
        for s in range(0, n, step):
            lo = 0 if s == 0 else s + (window - step)
            hi = min(s + window, n)
            if lo >= n:
                break
            plans.append(WindowPlan(s, hi, lo, hi))  # look-back only: no need to read past hi
    else:
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    return plans


def _ahead(plan: WindowPlan, direction: str) -> torch.Tensor:
    k = torch.arange(plan.lo, plan.hi, dtype=torch.int64)
    return plan.end - k if direction == "reverse" else k - plan.start + 1


def _doc_sha(doc: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(doc.numpy(), dtype="<i8").tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name.split(".", 1)[0] + ".sha256")


def _write_checked(target: Path, data: bytes, sidecar: Path | None = None) -> None:
    """Write ``data`` atomically, then its size and sha256 into ``sidecar`` (which marks it complete)."""
    atomic_write_bytes(target, data)
    record = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(sidecar or _sidecar(target), json.dumps(record).encode())


def file_problem(path: Path, sidecar: Path, full: bool) -> str | None:
    """Why ``path`` does not match its ``sidecar`` record (size; with ``full`` also sha256),
    or ``None`` if it does."""
    try:
        record = json.loads(sidecar.read_text())
        size, digest = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        return "not complete (no checksum record)"
    except (ValueError, KeyError, TypeError, OSError):
        return "its checksum record is unreadable"
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{actual} bytes instead of {size}"
    if full and file_sha256(path) != digest:
        return "its content does not match its checksum"
    return None


def _write_document(target: Path, features: torch.Tensor, ahead: torch.Tensor, meta: dict) -> None:
    data = save({"features": features.contiguous(), "ahead": ahead.contiguous()},
                metadata={k: str(v) for k, v in meta.items()})
    _write_checked(target, data)


def _check_finite(features: torch.Tensor, doc: int, stage: str) -> None:
    bad = ~torch.isfinite(features)
    if bad.any():
        pos, dim = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(
            f"non-finite feature {float(features[pos, dim])} in document {doc} at position {pos} "
            f"(hidden dim {dim}, {int(bad.any(dim=1).sum())} positions affected) {stage}"
        )


class CacheFolder:
    """What every feature-cache folder shares: its ``meta.json`` (format, corpus fingerprint,
    document lengths, hidden size), the checks made when it is opened, and the properties
    read from it. Subclasses say what they are called and what a complete folder holds."""

    kind = "feature cache"
    format_version = _FORMAT

    def _read_meta(self, directory: str | Path, corpus: TokenizedCorpus | Any | None) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no {self.kind} at {self.directory} (meta.json missing)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.kind} at {self.directory} is corrupt: meta.json is not valid JSON "
                             f"({err}); delete the folder to rebuild it") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != self.format_version:
            raise ValueError(f"{self.kind} at {self.directory} has an unknown format")
        if corpus is not None and corpus.fingerprint != self.meta["corpus"]:
            raise ValueError(
                f"{self.kind} at {self.directory} was built for corpus "
                f"{self.meta.get('corpus_name')!r} ({len(self)} documents, fingerprint "
                f"{self.meta['corpus'][:12]}), not for corpus {getattr(corpus, 'name', None)!r} "
                f"({len(corpus)} documents, fingerprint {corpus.fingerprint[:12]})"
            )

    def _require_complete(self, missing: list[int], total: int, unit: str) -> None:
        if missing:
            raise ValueError(
                f"{self.kind} at {self.directory} is incomplete: {len(missing)} of {total} "
                f"{unit} missing (first {missing[:5]}); run build again"
            )

    def __len__(self) -> int:
        return len(self.meta["lengths"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def lengths(self) -> list[int]:
        return list(self.meta["lengths"])

    @property
    def corpus_fingerprint(self) -> str:
        return str(self.meta["corpus"])


class FeatureCache(CacheFolder):
    """Stored features of every document of one corpus for one frozen extractor.

    Use :meth:`build` (computes what is missing, then opens) or :meth:`open`.
    ``cache[i]`` returns ``(features (time, hidden) float32, ahead (time,) int64)`` for
    document ``i``.
    """

    def __init__(self, directory: str | Path, corpus: TokenizedCorpus | None = None) -> None:
        self._read_meta(directory, corpus)
        self._verified: set[int] = set()
        missing = [i for i in range(len(self)) if self._doc_problem(i) is not None]
        self._require_complete(missing, len(self), "documents")

    def _doc_problem(self, i: int, full: bool = False) -> str | None:
        path = self._doc_path(i)
        return file_problem(path, _sidecar(path), full)

    def _verify(self, i: int) -> None:
        """Check document ``i``'s file against its checksum (once per process)."""
        if i in getattr(self, "_verified", set()):
            return
        problem = self._doc_problem(i, full=True)
        if problem is not None:
            _sidecar(self._doc_path(i)).unlink(missing_ok=True)  # the next build recomputes it
            raise ValueError(f"feature cache {self.directory}: document {i} is corrupt ({problem}); "
                             "it is rebuilt by the next run")
        self._verified.add(i)

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        self._verify(i)
        try:
            return load_file(self._doc_path(i))
        except (SafetensorError, OSError) as err:
            _sidecar(self._doc_path(i)).unlink(missing_ok=True)
            raise ValueError(f"feature cache {self.directory}: document {i} is unreadable ({err}); "
                             "it is rebuilt by the next run") from None

    @classmethod
    def open(cls, directory: str | Path, corpus: TokenizedCorpus | None = None) -> FeatureCache:
        """Open a complete cache; with ``corpus``, check it is the corpus it was built for."""
        return cls(directory, corpus)

    # ------------------------------------------------------------------ properties
    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def overlap(self) -> bool:
        return bool(self.meta["overlap"])

    @property
    def direction(self) -> str:
        return str(self.meta["direction"])

    @property
    def extractor_fingerprint(self) -> str:
        return str(self.meta["extractor"])

    def _doc_path(self, i: int) -> Path:
        return self.directory / f"doc{i:06d}.safetensors"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (time, hidden) float32, ahead (time,) int64)`` of document ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a cache of {n} documents")
        i = i % n
        path = self._doc_path(i)
        if not path.is_file():
            raise FileNotFoundError(f"document {i} is missing from the feature cache {path.parent}")
        data = self._load(i)
        features, ahead = data["features"].float(), data["ahead"]
        if features.shape != (self.lengths[i], self.hidden_size) or ahead.shape != (self.lengths[i],):
            raise ValueError(
                f"cached document {i} has features {tuple(features.shape)} and ahead {tuple(ahead.shape)}, expected "
                f"({self.lengths[i]}, {self.hidden_size})"
            )
        return features, ahead

    def slice(self, i: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[start, stop)`` of document ``i`` without reading the rest of the file.

        Returns:
            ``(features (stop - start, hidden) float32, ahead (stop - start,) int64)``.
        """
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for a cache of {n} documents")
        length = self.lengths[i]
        if not 0 <= start < stop <= length:
            raise ValueError(
                f"slice [{start}, {stop}) is not inside document {i} of {length} tokens"
            )
        self._verify(i)
        with safe_open(self._doc_path(i), framework="pt") as fh:
            features = fh.get_slice("features")[start:stop]
            ahead = fh.get_slice("ahead")[start:stop]
        return features.float(), ahead

    def preload(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every document as stored (``features`` in the stored dtype), for in-memory use."""
        out = []
        for i in range(len(self)):
            data = self._load(i)
            out.append((data["features"], data["ahead"]))
        return out

    # ------------------------------------------------------------------ building
    @staticmethod
    def key(
        extractor_fingerprint: str,
        corpus_fingerprint: str,
        window: int,
        overlap: bool,
        dtype: torch.dtype = torch.float16,
    ) -> str:
        """Directory name: sha256 of the extractor and corpus fingerprints and the windowing."""
        text = "\n".join(
            [
                extractor_fingerprint,
                corpus_fingerprint,
                str(window),
                str(overlap),
                _dtype_name(dtype),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @classmethod
    def build(
        cls,
        extractor: torch.nn.Module,
        corpus: TokenizedCorpus,
        window: int = 256,
        overlap: bool = True,
        dtype: torch.dtype = torch.float16,
        batch_size: int = 8,
        root: str | Path | None = None,
        progress: bool = True,
    ) -> FeatureCache:
        """Compute (or complete) the cache and open it.

        Args:
            extractor: a frozen feature extractor (``trainable="frozen"``) with ``fingerprint``,
                ``hidden_size``, ``direction`` and ``forward(tokens, lengths)``.
            corpus: the documents.
            window: tokens per encoder call ``W`` (>= 2).
            overlap: windows start every ``W/2`` tokens (else every ``W``).
            dtype: stored dtype (float16 halves the disk; float32 for exactness).
            batch_size: windows per encoder call.
            root: parent folder (default ``cache_dir()/"features"``).
            progress: show a tqdm bar.

        Raises:
            ValueError: for a trainable extractor, non-finite features (naming document and
                position), or an existing cache folder whose metadata disagrees.
        """
        if getattr(extractor, "trainable", "frozen") != "frozen":
            raise ValueError(
                f"only frozen extractors can be cached (got trainable={extractor.trainable!r}: "
                "its features change while it trains)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        direction = extractor.direction
        plans = [plan_windows(n, window, overlap, direction) for n in corpus.lengths]
        root = Path(root) if root is not None else cache_dir() / "features"
        fp = extractor.fingerprint
        directory = root / cls.key(fp, corpus.fingerprint, window, overlap, dtype)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "extractor": fp,
            "corpus": corpus.fingerprint,
            "corpus_name": corpus.name,
            "window": window,
            "overlap": overlap,
            "direction": direction,
            "dtype": _dtype_name(dtype),
            "hidden_size": int(extractor.hidden_size),
            "lengths": corpus.lengths,
        }
        meta_path = directory / "meta.json"
        old = None
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("feature cache %s: meta.json is corrupt; rebuilding the cache", directory)
        if isinstance(old, dict):
            diff = sorted(k for k in meta if k != "corpus_name" and old.get(k) != meta[k])
            if diff:
                raise ValueError(
                    f"feature cache at {directory} holds different data ({', '.join(diff)} differ); "
                    "delete the folder to rebuild it"
                )
        else:
            atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
        cache_self = cls.__new__(cls)
        cache_self.directory, cache_self.meta = directory, meta

        pending = [i for i in range(len(corpus)) if cache_self._doc_problem(i) is not None]
        corrupt = [i for i in pending if cache_self._doc_path(i).is_file()]
        if corrupt:
            logger.warning("feature cache %s: %d documents are incomplete or corrupt (first %s: %s); "
                           "recomputing them", directory.name, len(corrupt), corrupt[0],
                           cache_self._doc_problem(corrupt[0]))
        if pending:
            logger.info(
                "feature cache %s: computing %d of %d documents",
                directory.name,
                len(pending),
                len(corpus),
            )
            cache_self._compute(extractor, corpus, plans, pending, dtype, batch_size, progress)
        return cls(directory, corpus)

    def _compute(
        self,
        extractor: torch.nn.Module,
        corpus: TokenizedCorpus,
        plans: list[list[WindowPlan]],
        pending: list[int],
        dtype: torch.dtype,
        batch_size: int,
        progress: bool,
    ) -> None:
        """Encode the windows of the ``pending`` documents in batches; write each document as
        soon as all its windows are done."""
        from tqdm import tqdm

        direction = extractor.direction
        device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
        jobs = [(i, p) for i in pending for p in plans[i]]
        remaining = {i: len(plans[i]) for i in pending}
        buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hidden = int(extractor.hidden_size)
        bar = tqdm(
            total=sum(corpus.lengths[i] for i in pending),
            unit="tok",
            desc="features",
            disable=not progress,
            leave=False,
        )
        was_training = extractor.training
        extractor.eval()
        try:
            for b in range(0, len(jobs), batch_size):
                chunk = jobs[b : b + batch_size]
                lengths = torch.tensor([p.end - p.start for _, p in chunk], dtype=torch.int64)
                tokens = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.int64)
                for row, (i, p) in enumerate(chunk):
                    tokens[row, : p.end - p.start] = corpus.documents[i][p.start : p.end]
                with torch.no_grad():
                    out = extractor(tokens.to(device), lengths.to(device)).float().cpu()
                for row, (i, p) in enumerate(chunk):
                    n = corpus.lengths[i]
                    if i not in buffers:
                        buffers[i] = (
                            torch.empty(n, hidden, dtype=torch.float32),
                            torch.empty(n, dtype=torch.int64),
                        )
                    feats, ahead = buffers[i]
                    feats[p.lo : p.hi] = out[row, p.lo - p.start : p.hi - p.start]
                    ahead[p.lo : p.hi] = _ahead(p, direction)
                    bar.update(p.hi - p.lo)
                    remaining[i] -= 1
                    if remaining[i] == 0:
                        feats, ahead = buffers.pop(i)
                        _check_finite(feats, i, "from the extractor")
                        stored = feats.to(dtype)
                        _check_finite(
                            stored.float(), i, f"after conversion to {dtype}; use float32"
                        )
                        _write_document(
                            self._doc_path(i),
                            stored,
                            ahead,
                            {
                                "document": i,
                                "length": n,
                                "tokens_sha256": _doc_sha(corpus.documents[i]),
                            },
                        )
        finally:
            bar.close()
            extractor.train(was_training)
