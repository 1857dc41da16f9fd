"""Batched truncated BPTT over whole documents with the state carried between windows.

``B`` streams read documents, longest first. Each window covers the next ``L`` positions of
every stream, with ``L = min(window, shortest remaining document)``: the window shrinks to
the nearest document end, so every row is aligned and no document is cut mid-window. With
``ragged=True`` instead ``L = min(window, longest remaining document)`` and a row whose
document ends inside the window is padded (its ``end`` stops there; its next document starts
with the next window): documents of unequal length no longer shrink every window to the
nearest end (with 32 streams over documents of a few hundred tokens the aligned windows are
mostly one token long, which leaves truncated BPTT no horizon). A row
that continues its document starts from the carried ``x_0`` (``q(x_1 | x_0, .)``); a row whose
document just began starts from ``q(x_1 | .)``. With ``overlap`` the guide also reads the
next ``L`` tokens (half-window look-ahead) while the ELBO covers only the first ``L``.
With ``emphasis=(cue, w)`` every position right after an occurrence of the token sequence
``cue`` in its document (found across window edges) gets weight ``w`` in the batch's
``weight``, every other position 1 (:func:`emphasis_weights`).

:class:`StreamCursor` keeps one reader's place in the streams across epochs (with the carried
states); :func:`shard_order` gives each rank of a distributed run its disjoint share of the
documents. Windows are built on the CPU; :func:`batch_to` moves a batch to the model's device
and :func:`attach_carried` puts carried states on the device and in the dtype they have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vmt.inference.subsequences import FeatureLookup
from vmt.models.batch import ChainBatch


@dataclass
class Window:
    """One window of the streams: a batch plus which documents and positions it covers."""

    batch: ChainBatch
    documents: list[int]
    offsets: list[int]


class DocumentStreams:
    """Iterate windows over documents with carried state.

    Args:
        documents: ``(time,)`` tokens or ``(time, obs)`` arrays.
        streams: number of parallel rows ``B``.
        window: the largest window ``L``.
        features: optional lookup of cached features per document.
        overlap: give a trainable reader half a window of look-ahead beyond the window.
        order: indices of documents in reading order (default: longest first); documents
            not named are not read.
        lengths: the documents' lengths, if known without reading them (e.g. a memory-mapped
            corpus's ``length_array``); default: ``len`` of each document.
        ragged: windows as long as the longest remaining document (up to ``window``), rows
            whose document ends inside them padded, instead of aligned to the nearest end.
        emphasis: ``(cue, weight)``: the batches carry ``weight (batch, time)``, ``weight`` at
            the position after each occurrence of the token ids ``cue`` and 1 elsewhere
            (token documents only); ``None``: no weights.
    """

    def __init__(
        self,
        documents: Sequence[torch.Tensor],
        streams: int,
        window: int,
        features: FeatureLookup | None = None,
        overlap: bool = False,
        order: Sequence[int] | None = None,
        lengths: Sequence[int] | None = None,
        ragged: bool = False,
        emphasis: tuple[Sequence[int], float] | None = None,
    ):
        if streams < 1 or window < 1:
            raise ValueError(f"streams and window must be >= 1, got {streams}, {window}")
        # a Sequence (list, lazy memory-mapped view) is kept as is; anything else is listed
        self.documents = documents if isinstance(documents, Sequence) else list(documents)
        if not len(self.documents):
            raise ValueError("no documents to read")
        if lengths is None:
            self.lengths = [len(d) for d in self.documents]
        else:
            self.lengths = [int(n) for n in lengths]
            if len(self.lengths) != len(self.documents):
                raise ValueError(
                    f"lengths has {len(self.lengths)} entries for {len(self.documents)} documents"
                )
        self.streams = streams
        self.window = window
        self.features = features
        self.overlap = overlap
        self.ragged = ragged
        if emphasis is not None:
            cue, weight = emphasis
            if not len(cue) or not weight > 0:
                raise ValueError(f"emphasis needs a non-empty cue and a weight > 0, got {tuple(cue)} and {weight}")
            emphasis = (tuple(int(t) for t in cue), float(weight))
        self.emphasis = emphasis
        if order is None:
            order = sorted(range(len(self.documents)), key=lambda i: -self.lengths[i])
        self.order = [i for i in order if self.lengths[i] > 0]

    def _schedule(self) -> Iterator[tuple[list[list[int]], int]]:
        """``(active, steps)`` for every window: the ``[document, offset]`` of each stream and
        the window's length (from the lengths alone; ``active`` is valid until the next item)."""
        queue = list(self.order)
        active: list[list[int]] = []  # [document, offset]
        while queue or active:
            while len(active) < self.streams and queue:
                active.append([queue.pop(0), 0])
            remaining = [self.lengths[d] - o for d, o in active]
            steps = min(self.window, max(remaining) if self.ragged else min(remaining))
            yield active, steps
            for entry in active:
                entry[1] += steps
            active = [e for e in active if e[1] < self.lengths[e[0]]]

    def __iter__(self) -> Iterator[Window]:
        for active, steps in self._schedule():
            yield self._window(active, steps)

    def window_lengths(self) -> list[int]:
        """The length of every window of one pass over the documents, in order, without
        reading a document: ``len`` of it is the number of windows-regime training steps that
        read every document once."""
        return [steps for _, steps in self._schedule()]

    def _window(self, active: list[list[int]], steps: int) -> Window:
        docs = [d for d, _ in active]
        offs = [o for _, o in active]
        rows = len(active)
        ends = [min(steps, self.lengths[d] - o) for d, o in active]  # < steps: padded (ragged)
        pieces = [self.documents[d][o : o + steps] for d, o in active]
        obs = pieces[0].new_zeros((rows, steps) + tuple(pieces[0].shape[1:]))
        for r, piece in enumerate(pieces):
            obs[r, : len(piece)] = piece
        carried = torch.tensor([o > 0 for o in offs])
        batch = ChainBatch(
            obs=obs,
            start=torch.zeros(rows, dtype=torch.long),
            end=torch.tensor(ends, dtype=torch.long),
            carried=carried,
        )
        if self.emphasis is not None:
            weight = torch.ones(rows, steps)
            for r, (d, o) in enumerate(active):
                w = emphasis_weights(self.documents[d], o, ends[r], *self.emphasis)
                weight[r, : len(w)] = w
            batch = batch.with_(weight=weight)
        if self.features is not None:
            feats = [self.features(d)[0] for d, _ in active]
            for (d, _), f in zip(active, feats, strict=True):
                if f.shape[0] != self.lengths[d]:
                    raise ValueError(f"the feature lookup gave {f.shape[0]} positions for document {d} "
                                     f"of {self.lengths[d]} tokens")
            cut = [f[o : o + steps] for f, (_, o) in zip(feats, active, strict=True)]
            padded = cut[0].new_zeros((rows, steps) + tuple(cut[0].shape[1:]))
            for r, f in enumerate(cut):
                padded[r, : len(f)] = f
            return Window(batch.with_(features=padded), docs, offs)
        read = 2 * steps if self.overlap else steps
        inputs, lengths = [], []
        for d, o in active:
            seg = self.documents[d][o : o + read]
            lengths.append(len(seg))
            inputs.append(seg)
        width = max(lengths)
        reader_input = inputs[0].new_zeros((rows, width) + tuple(inputs[0].shape[1:]))
        for i, seg in enumerate(inputs):
            reader_input[i, : len(seg)] = seg
        return Window(
            batch.with_(reader_input=reader_input, reader_lengths=torch.tensor(lengths)), docs, offs
        )


def emphasis_weights(document: torch.Tensor, offset: int, steps: int, cue: Sequence[int],
                     weight: float) -> torch.Tensor:
    """``(steps,)`` float weights of positions ``offset .. offset + steps - 1`` of ``document``
    (``(time,)`` token ids): ``weight`` where the ``len(cue)`` tokens just before a position are
    ``cue`` (they may lie before ``offset``, in an earlier window), 1 elsewhere.

    Example: document ``[5, 1, 2, 7, 1, 2, 9]``, cue ``[1, 2]``, weight 4, offset 3, steps 4
    (positions 3 .. 6): ``[4, 1, 1, 4]``; position 3 follows the cue at positions 1 and 2,
    which the previous window read.
    """
    n = len(cue)
    lo = max(offset - n, 0)
    seg = document[lo: offset + steps]
    out = torch.ones(steps)
    if seg.dim() != 1:
        raise ValueError(f"emphasis needs (time,) token documents, got a document of shape {tuple(document.shape)}")
    if len(seg) <= n:
        return out
    cue_t = torch.as_tensor(cue, dtype=seg.dtype)
    hits = (seg.unfold(0, n, 1)[:-1] == cue_t).all(-1)  # hits[i]: seg[i : i + n] == cue
    after = torch.nonzero(hits).flatten() + n + lo - offset  # positions right after a cue, window-relative
    after = after[(after >= 0) & (after < steps)]
    out[after] = float(weight)
    return out


def attach_carried(window: Window, carried: dict[int, torch.Tensor], state_dim: int,
                   particles: int | None = None) -> ChainBatch:
    """Put the carried states of continuing rows into the window's batch as ``x0``.

    Without ``particles`` a carried state is ``(state,)`` and ``x0`` is ``(batch, state)``.
    With ``particles = k`` a carried state is ``(k, state)`` (one per particle) and every
    row of the window is repeated ``k`` times (row ``r`` becomes rows ``r * k .. r * k + k - 1``,
    reading the features of row ``r`` through ``source``), so ``x0`` is ``(batch * k, state)``.
    ``x0`` is on the device and in the dtype of the carried states (which are the model's
    sampled states); the window's own tensors are not moved (see :func:`batch_to`).
    """
    if particles is not None and particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    batch = window.batch
    if particles is not None:
        idx = torch.arange(batch.num_rows, device=batch.obs.device).repeat_interleave(particles)
        batch = batch.with_(obs=batch.obs[idx], start=batch.start[idx], end=batch.end[idx], source=idx,
                            carried=batch.carried[idx] if batch.carried is not None else None)
    if not bool(batch.carried_rows().any()):
        return batch.with_(carried=None)
    rows = [r for r in range(window.batch.num_rows) if window.offsets[r] > 0]
    missing = [window.documents[r] for r in rows if window.documents[r] not in carried]
    if missing:
        raise RuntimeError(f"document {missing[0]} continues but no state was carried for it")
    first = carried[window.documents[rows[0]]]
    shape = (state_dim,) if particles is None else (particles, state_dim)
    if first.shape != shape:
        raise ValueError(f"carried states must be {shape}, got {tuple(first.shape)}")
    k = particles or 1
    x0 = first.new_zeros(batch.num_rows, state_dim)  # (batch * k, state)
    for r in rows:
        x0[r * k : (r + 1) * k] = carried[window.documents[r]]
    return batch.with_(x0=x0)


def continuing_states(window: Window, last: torch.Tensor, lengths: Sequence[int]) -> dict[int, torch.Tensor]:
    """The states to carry out of ``window``: ``last[r]`` for each row ``r`` whose document
    continues into the next window, keyed by document (the others are dropped, so the dict
    holds at most one entry per stream).

    Args:
        window: the window just read.
        last: ``(batch, ...)`` the last state of each row (``(batch, state)``, or
            ``(batch, particles, state)``).
        lengths: token count of every document.
    """
    steps = window.batch.num_steps
    return {d: last[r] for r, d in enumerate(window.documents) if window.offsets[r] + steps < lengths[d]}


def batch_to(batch: ChainBatch, device: torch.device | str) -> ChainBatch:
    """The batch with every tensor moved to ``device`` (dtypes unchanged)."""
    changes = {
        f.name: getattr(batch, f.name).to(device)
        for f in dataclasses.fields(batch)
        if torch.is_tensor(getattr(batch, f.name))
    }
    return batch.with_(**changes)


def shard_order(lengths: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The documents rank ``rank`` of ``world_size`` reads, in reading order.

    Rank ``r`` owns documents ``r, r + W, r + 2W, ...`` that are not empty, longest first (ties
    in index order): the shares are disjoint, cover every document, and depend only on the
    lengths, the rank and the world size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    share = [i for i in range(rank, len(lengths), world_size) if int(lengths[i]) > 0]
    return sorted(share, key=lambda i: -int(lengths[i]))


class StreamCursor:
    """One reader's place in :class:`DocumentStreams`, across epochs, with its carried states.

    The windows regime of both trainers: windows are taken in order; when the streams run
    out a new epoch starts from the first window with no carried state. :meth:`carry` keeps
    the last sampled state (detached: truncated BPTT) of the documents that continue into the
    next window, the only ones :func:`attach_carried` reads, so memory stays bounded by the
    number of streams, whatever the number of documents.

    Args:
        streams: the streams to walk.
        window_index: windows of the current epoch already taken (to resume).
        carried: the carried states at that point, keyed by document.
    """

    def __init__(
        self,
        streams: DocumentStreams,
        window_index: int = 0,
        carried: dict[int, torch.Tensor] | None = None,
    ) -> None:
        if window_index < 0:
            raise ValueError(f"window_index must be >= 0, got {window_index}")
        self.streams = streams
        self.window_index = window_index
        self.carried: dict[int, torch.Tensor] = dict(carried or {})
        self._windows: Iterator[Window] | None = None

    def restart(self) -> None:
        """Back to the first window of an epoch, with no carried state."""
        self._windows, self.window_index, self.carried = None, 0, {}

    def next_window(self) -> Window:
        """The next window (a new epoch begins when the streams run out)."""
        if self._windows is None:
            self._windows = iter(self.streams)
            for taken in range(self.window_index):  # fast-forward after a resume
                if next(self._windows, None) is None:
                    raise ValueError(
                        f"window_index {self.window_index} is past the end of an epoch of "
                        f"{taken} windows"
                    )
        window = next(self._windows, None)
        if window is None:
            self.restart()
            self._windows = iter(self.streams)
            window = next(self._windows, None)
            if window is None:
                raise ValueError("the streams hold no window (every document is empty)")
        self.window_index += 1
        return window

    def carry(self, window: Window, x: torch.Tensor) -> None:
        """Keep the last sampled state of each row of ``window`` whose document continues.

        Args:
            window: the window just trained on.
            x: ``(batch, time, state)`` the path sampled on it.
        """
        self.carried = continuing_states(window, x[:, -1].detach(), self.streams.lengths)
