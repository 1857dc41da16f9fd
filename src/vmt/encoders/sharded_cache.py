"""Frozen-encoder features sharded on disk as numpy memory maps, built in resumable chunks.

The same windowing as :class:`vmt.encoders.cache.FeatureCache` (:func:`plan_windows`), the
same lookup ``cache[i] -> (features (time, hidden) float32, ahead (time,) int64)``, but laid
out for corpora of millions of documents::

    meta.json                       extractor and corpus fingerprints, windowing, shard table
    shard00000.features.npy         (shard tokens, hidden) float16 or float32
    shard00000.ahead.npy            (shard tokens,) int64
    ...

A shard holds the consecutive documents whose tokens fill about ``shard_tokens`` positions
(a document is never split). Shards are computed one at a time; each file is written to a
temporary name and renamed, then a record of both files' sizes and sha256
(``shard00000.sha256``) is written last, so a shard with a record is complete. A build that is interrupted (killed, or an exception) leaves only complete shards,
and running it again computes just the missing ones: the result is the same as an
uninterrupted build.

Lookups memory-map the shard files: reading a document touches only its rows.

Integrity: opening checks every shard's file sizes against its record (cheap); the first
lookup in a shard checks both files' sha256 and their shapes. A shard that fails is never
used: :meth:`ShardedFeatureCache.build` recomputes it, and a lookup raises a ValueError naming
it and removes its record so that the next build recomputes it.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmt.atomic import atomic_write, atomic_write_bytes
from vmt.encoders.cache import (
    CacheFolder,
    WindowPlan,
    _ahead,
    _check_finite,
    file_sha256,
    plan_windows,
)
from vmt.encoders.features import encoder_autocast

logger = logging.getLogger(__name__)

__all__ = ["ShardedFeatureCache"]

_FORMAT = 1
_NP_DTYPES = {torch.float16: "float16", torch.float32: "float32"}


def _save_npy(target: Path, array: np.ndarray) -> None:
    with atomic_write(target, fsync=True) as fh:
        np.save(fh, array)


def shard_table(lengths: list[int], shard_tokens: int) -> list[tuple[int, int]]:
    """``[(first document, end document), ...]``: consecutive documents filling about
    ``shard_tokens`` positions each (at least one document per shard)."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    table, start, filled = [], 0, 0
    for i, n in enumerate(lengths):
        if filled and filled + n > shard_tokens:
            table.append((start, i))
            start, filled = i, 0
        filled += n
    table.append((start, len(lengths)))
    return table


class ShardedFeatureCache(CacheFolder):
    """Features of every document of a corpus, in memory-mapped shards.

    Use :meth:`build` (computes what is missing, then opens) or open a folder directly.
    ``cache[i]`` is ``(features (time, hidden) float32, ahead (time,) int64)`` of document ``i``.
    """

    kind = "sharded feature cache"
    format_version = _FORMAT

    def __init__(self, directory: str | Path, corpus: Any = None, max_open: int = 8) -> None:
        self._read_meta(directory, corpus)
        missing = [s for s in range(self.num_shards) if not self._done(s)]
        self._require_complete(missing, self.num_shards, "shards")
        lengths = np.asarray(self.meta["lengths"], dtype=np.int64)
        self._lengths = lengths
        self._shard_of = np.empty(len(lengths), dtype=np.int64)
        self._row = np.empty(len(lengths), dtype=np.int64)
        for s, (a, b) in enumerate(self.meta["shards"]):
            self._shard_of[a:b] = s
            self._row[a:b] = np.concatenate([[0], np.cumsum(lengths[a:b])[:-1]])
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.max_open = max_open

    # ------------------------------------------------------------------ properties
    @property
    def num_shards(self) -> int:
        return len(self.meta["shards"])

    def _paths(self, shard: int) -> tuple[Path, Path]:
        stem = self.directory / f"shard{shard:05d}"
        return stem.with_name(stem.name + ".features.npy"), stem.with_name(stem.name + ".ahead.npy")

    def _record_path(self, shard: int) -> Path:
        return self.directory / f"shard{shard:05d}.sha256"

    def _problem(self, shard: int, full: bool = False) -> str | None:
        """Why shard ``shard`` is not usable (sizes; with ``full`` also sha256), or ``None``."""
        try:
            record = json.loads(self._record_path(shard).read_text())
        except FileNotFoundError:
            return "not complete (no checksum record)"
        except (ValueError, OSError):
            return "its checksum record is unreadable"
        for path in self._paths(shard):
            entry = record.get(path.name) if isinstance(record, dict) else None
            if not isinstance(entry, dict) or not path.is_file():
                return f"{path.name} is missing"
            if path.stat().st_size != entry.get("bytes"):
                return f"{path.name} has {path.stat().st_size} bytes instead of {entry.get('bytes')}"
            if full and file_sha256(path) != entry.get("sha256"):
                return f"{path.name} does not match its checksum"
        return None

    def _done(self, shard: int) -> bool:
        return self._problem(shard) is None

    def _corrupt(self, shard: int, problem: str):
        self._record_path(shard).unlink(missing_ok=True)  # the next build recomputes the shard
        return ValueError(f"{self.kind} {self.directory}: shard {shard} is corrupt ({problem}); "
                          "it is rebuilt by the next build")

    def _maps(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        problem = self._problem(shard, full=True)
        if problem is not None:
            raise self._corrupt(shard, problem)
        feats, ahead = self._paths(shard)
        try:
            maps = (np.load(feats, mmap_mode="r"), np.load(ahead, mmap_mode="r"))
        except (ValueError, OSError, EOFError) as err:
            raise self._corrupt(shard, f"unreadable: {err}") from None
        a, b = self.meta["shards"][shard]
        rows = int(self._lengths[a:b].sum())
        if maps[0].shape != (rows, self.hidden_size) or maps[1].shape != (rows,):
            raise self._corrupt(shard, f"features {maps[0].shape} and ahead {maps[1].shape}, expected "
                                       f"({rows}, {self.hidden_size}) and ({rows},)")
        self._open[shard] = maps
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return maps

    def _locate(self, i: int) -> tuple[int, int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a cache of {n} documents")
        i %= n
        return int(self._shard_of[i]), int(self._row[i]), int(self._lengths[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (time, hidden) float32, ahead (time,) int64)`` of document ``i``."""
        shard, row, n = self._locate(i)
        feats, ahead = self._maps(shard)
        f = torch.from_numpy(np.array(feats[row : row + n], dtype=np.float32))
        return f, torch.from_numpy(np.array(ahead[row : row + n], dtype=np.int64))

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self[i]

    def slice(self, i: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[start, stop)`` of document ``i``, reading only those rows."""
        shard, row, n = self._locate(i)
        if not 0 <= start < stop <= n:
            raise ValueError(f"slice [{start}, {stop}) is not inside document {i} of {n} tokens")
        feats, ahead = self._maps(shard)
        f = torch.from_numpy(np.array(feats[row + start : row + stop], dtype=np.float32))
        return f, torch.from_numpy(np.array(ahead[row + start : row + stop], dtype=np.int64))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        extractor: torch.nn.Module,
        corpus: Any,
        directory: str | Path,
        window: int = 256,
        overlap: bool = True,
        dtype: torch.dtype = torch.float16,
        batch_size: int = 8,
        shard_tokens: int = 1 << 20,
        autocast: bool | None = None,
        progress: bool = True,
        on_shard: Callable[[int], None] | None = None,
    ) -> ShardedFeatureCache:
        """Compute the missing shards and open the cache.

        Args:
            extractor: a frozen extractor (``trainable="frozen"``) with ``fingerprint``,
                ``hidden_size``, ``direction`` and ``forward(tokens, lengths)``.
            corpus: a :class:`vmt.data.corpus.TokenizedCorpus` or
                :class:`vmt.data.memmap.MemmapCorpus`.
            directory: the cache folder.
            window: tokens per encoder call ``W`` (>= 2).
            overlap: windows start every ``W/2`` tokens (else every ``W``).
            dtype: stored dtype, float16 or float32.
            batch_size: windows per encoder call.
            shard_tokens: positions per shard (the unit of resumption).
            autocast: bf16 autocast around the encoder (default: on CUDA only).
            progress: show a tqdm bar.
            on_shard: called with the shard index after each shard is written.

        Raises:
            ValueError: for a trainable extractor, a bad dtype, non-finite features, or a
                folder holding a different cache.
        """
        from tqdm.auto import tqdm

        if getattr(extractor, "trainable", "frozen") != "frozen":
            raise ValueError(
                f"only frozen extractors can be cached (got trainable={extractor.trainable!r})"
            )
        if dtype not in _NP_DTYPES:
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lengths = [int(n) for n in corpus.lengths]
        shards = shard_table(lengths, shard_tokens)
        meta = {
            "format": _FORMAT,
            "extractor": extractor.fingerprint,
            "corpus": corpus.fingerprint,
            "window": window,
            "overlap": overlap,
            "direction": extractor.direction,
            "dtype": _NP_DTYPES[dtype],
            "hidden_size": int(extractor.hidden_size),
            "lengths": lengths,
            "shards": [list(s) for s in shards],
        }
        meta_path = directory / "meta.json"
        old = None
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("sharded feature cache %s: meta.json is corrupt; rebuilding", directory)
        if isinstance(old, dict):
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                raise ValueError(
                    f"sharded feature cache at {directory} holds different data "
                    f"({', '.join(diff)} differ); delete the folder to rebuild it"
                )
        else:
            atomic_write_bytes(meta_path, json.dumps(meta).encode())
        cache = cls.__new__(cls)
        cache.directory, cache.meta = directory, meta
        pending = [s for s in range(len(shards)) if not cache._done(s)]
        corrupt = [s for s in pending if any(p.exists() for p in cache._paths(s))]
        if corrupt:
            logger.warning("sharded feature cache %s: %d shards are incomplete or corrupt (first %d: %s); "
                           "recomputing them", directory, len(corrupt), corrupt[0], cache._problem(corrupt[0]))
        device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
        bar = tqdm(total=sum(sum(lengths[a:b]) for a, b in (shards[s] for s in pending)),
                   unit="tok", desc="features", disable=not progress)
        was_training = extractor.training
        extractor.eval()
        try:
            for s in pending:
                a, b = shards[s]
                feats, ahead = cache._compute_shard(
                    extractor, corpus, range(a, b), window, overlap, batch_size, device, autocast
                )
                _check_finite(feats, a, f"in shard {s} from the extractor")
                stored = feats.to(dtype)
                _check_finite(stored.float(), a, f"in shard {s} after conversion to {dtype}")
                f_path, a_path = cache._paths(s)
                _save_npy(f_path, stored.numpy())
                _save_npy(a_path, ahead.numpy())
                record = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                          for p in (f_path, a_path)}
                # written last: marks the shard complete
                atomic_write_bytes(cache._record_path(s), json.dumps(record).encode())
                bar.update(int(feats.shape[0]))
                if on_shard is not None:
                    on_shard(s)
        finally:
            bar.close()
            extractor.train(was_training)
        return cls(directory, corpus)

    @staticmethod
    def _compute_shard(extractor, corpus, docs: range, window: int, overlap: bool,
                       batch_size: int, device: torch.device, autocast: bool | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (tokens, hidden) float32, ahead (tokens,) int64)`` of documents ``docs``
        laid end to end."""
        direction = extractor.direction
        lengths = [len(corpus.documents[i]) for i in docs]
        base = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(base[-1])
        feats = torch.empty(total, int(extractor.hidden_size), dtype=torch.float32)
        ahead = torch.empty(total, dtype=torch.int64)
        jobs: list[tuple[int, WindowPlan]] = [
            (k, p) for k, n in enumerate(lengths) for p in plan_windows(n, window, overlap, direction)
        ]
        documents = {k: corpus.documents[i] for k, i in enumerate(docs)}
        for j in range(0, len(jobs), batch_size):
            chunk = jobs[j : j + batch_size]
            sizes = torch.tensor([p.end - p.start for _, p in chunk], dtype=torch.int64)
            tokens = torch.zeros(len(chunk), int(sizes.max()), dtype=torch.int64)
            for row, (k, p) in enumerate(chunk):
                tokens[row, : p.end - p.start] = documents[k][p.start : p.end]
            with torch.no_grad(), encoder_autocast(device, autocast):
                out = extractor(tokens.to(device), sizes.to(device)).float().cpu()
            for row, (k, p) in enumerate(chunk):
                o = int(base[k])
                feats[o + p.lo : o + p.hi] = out[row, p.lo - p.start : p.hi - p.start]
                ahead[o + p.lo : o + p.hi] = _ahead(p, direction)
        return feats, ahead
