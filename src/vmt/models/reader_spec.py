"""The reader a VMT owns, as a JSON spec ``{"kind": ..., "kwargs": {...}}`` and back.

A checkpoint stores the spec; :func:`build_reader` rebuilds the network from it. The small
reader networks themselves live in :mod:`vmt.encoders.small_readers`; the folded one
(:class:`FoldedReader`) wraps :class:`vmt.nn.folded.FoldedTransformer`.
"""

from __future__ import annotations

import torch
from torch import nn


class FoldedReader(nn.Module):
    """A :class:`vmt.nn.folded.FoldedTransformer` reading the sequence in reverse.

    ``out[b, k]`` summarises ``inputs[b, k:lengths[b]]`` through the folded (segment-recurrent)
    carry, so the guide's look-ahead is not limited to one attention window. ``kwargs`` are
    the fields of :class:`vmt.nn.folded.FoldedTransformerConfig`.
    """

    def __init__(self, **kwargs):
        super().__init__()
        from vmt.nn.folded import FoldedTransformer, FoldedTransformerConfig

        self.transformer = FoldedTransformer(FoldedTransformerConfig(**kwargs))
        self.hidden_size = self.transformer.hidden_size

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.transformer(inputs, lengths, reverse=True)


def build_reader(spec: dict) -> nn.Module:
    """Build the reader a checkpoint or a run configuration names.

    Kinds: ``"gru"`` (:class:`vmt.encoders.small_readers.GRUReader`), ``"transformer"``
    (:class:`vmt.encoders.small_readers.TransformerReader`), ``"folded"`` (:class:`FoldedReader`).
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a reader spec is a dict with a 'kind', got {spec!r}")
    kind, kwargs = spec["kind"], dict(spec.get("kwargs", {}))
    from vmt.encoders import small_readers

    table = {
        "gru": small_readers.GRUReader,
        "transformer": small_readers.TransformerReader,
        "folded": FoldedReader,
    }
    if kind not in table:
        raise ValueError(f"unknown reader kind {kind!r}; known: {sorted(table)}")
    return table[kind](**kwargs)
