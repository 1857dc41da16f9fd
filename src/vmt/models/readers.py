"""Trainable readers a VMT can own, rebuilt from a JSON spec ``{"kind": ..., "kwargs": {...}}``."""

from __future__ import annotations

from torch import nn


def build_reader(spec: dict) -> nn.Module:
    """Build the reader a checkpoint or a run configuration names.

    Kinds: ``"gru"`` (:class:`vmt.encoders.readers.GRUReader`), ``"transformer"``
    (:class:`vmt.encoders.readers.TransformerReader`).
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a reader spec is a dict with a 'kind', got {spec!r}")
    kind, kwargs = spec["kind"], dict(spec.get("kwargs", {}))
    from vmt.encoders import readers

    table = {"gru": readers.GRUReader, "transformer": readers.TransformerReader}
    if kind not in table:
        raise ValueError(f"unknown reader kind {kind!r}; known: {sorted(table)}")
    return table[kind](**kwargs)
