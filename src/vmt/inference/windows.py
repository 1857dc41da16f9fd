"""Batched truncated BPTT over whole documents with the state carried between windows.

``B`` streams read documents, longest first. Each window covers the next ``L`` positions of
every stream, with ``L = min(window, shortest remaining document)``: the window shrinks to
the nearest document end, so every row is aligned and no document is cut mid-window. A row
that continues its document starts from the carried ``x_0`` (``q(x_1 | x_0, .)``); a row whose
document just began starts from ``q(x_1 | .)``. With ``overlap`` the guide also reads the
next ``L`` tokens (half-window look-ahead) while the ELBO covers only the first ``L``.
"""

from __future__ import annotations

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
        order: indices of documents in reading order (default: longest first).
    """

    def __init__(
        self,
        documents: Sequence[torch.Tensor],
        streams: int,
        window: int,
        features: FeatureLookup | None = None,
        overlap: bool = False,
        order: Sequence[int] | None = None,
    ):
        if streams < 1 or window < 1:
            raise ValueError(f"streams and window must be >= 1, got {streams}, {window}")
        self.documents = list(documents)
        if not self.documents:
            raise ValueError("no documents to read")
        self.streams = streams
        self.window = window
        self.features = features
        self.overlap = overlap
        if order is None:
            order = sorted(range(len(self.documents)), key=lambda i: -len(self.documents[i]))
        self.order = [i for i in order if len(self.documents[i]) > 0]

    def __iter__(self) -> Iterator[Window]:
        queue = list(self.order)
        active: list[list[int]] = []  # [document, offset]
        while queue or active:
            while len(active) < self.streams and queue:
                active.append([queue.pop(0), 0])
            remaining = [len(self.documents[d]) - o for d, o in active]
            steps = min(self.window, min(remaining))
            yield self._window(active, steps)
            for entry in active:
                entry[1] += steps
            active = [e for e in active if e[1] < len(self.documents[e[0]])]

    def _window(self, active: list[list[int]], steps: int) -> Window:
        docs = [d for d, _ in active]
        offs = [o for _, o in active]
        rows = len(active)
        obs = torch.stack([self.documents[d][o : o + steps] for d, o in active])
        carried = torch.tensor([o > 0 for o in offs])
        batch = ChainBatch(
            obs=obs,
            start=torch.zeros(rows, dtype=torch.long),
            end=torch.full((rows,), steps, dtype=torch.long),
            carried=carried,
        )
        if self.features is not None:
            feats = torch.stack([self.features(d)[0][o : o + steps] for d, o in active])
            return Window(batch.with_(features=feats), docs, offs)
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


def carry_states(window: Window, x: torch.Tensor, previous: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Last sampled state of each row, keyed by document, detached (truncated BPTT)."""
    merged = dict(previous)
    for r, d in enumerate(window.documents):
        merged[d] = x[r, window.batch.num_steps - 1].detach()
    return merged


def attach_carried(window: Window, carried: dict[int, torch.Tensor], state_dim: int) -> ChainBatch:
    """Put the carried states of continuing rows into the window's batch as ``x0``."""
    batch = window.batch
    if not bool(batch.carried_rows().any()):
        return batch.with_(carried=None)
    dtype = next(iter(carried.values())).dtype if carried else torch.float32
    x0 = torch.zeros(batch.num_rows, state_dim, dtype=dtype)
    for r, d in enumerate(window.documents):
        if window.offsets[r] > 0:
            if d not in carried:
                raise RuntimeError(f"document {d} continues but no state was carried for it")
            x0[r] = carried[d]
    return batch.with_(x0=x0)
