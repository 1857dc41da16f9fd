"""Timing helpers for benchmarks on a shared, noisy machine: interleaved repeats, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1):
    """Median wall time of each callable, run round-robin so load spikes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_lengths(measure_length: Callable, setup, lengths: list[int], repeats: int | list[int]) -> dict:
    """``{L: measure_length(setup, L, repeats_L)}`` for every length, with ``setup.threads``
    torch threads during the measurement; ``repeats`` is one count or one per length."""
    import torch

    counts = [repeats] * len(lengths) if isinstance(repeats, int) else list(repeats)
    if len(counts) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths but {len(counts)} repeat counts")
    previous = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        return {L: measure_length(setup, L, r) for L, r in zip(lengths, counts, strict=True)}
    finally:
        torch.set_num_threads(previous)
