"""StreamingLLM (Xiao et al., 2024): attention sinks plus a rolling window of recent tokens.

The cache holds the first ``n_sinks`` tokens of the stream (the "attention sinks" that
softmax attention dumps probability mass on) and the newest tokens, up to ``budget`` tokens
in all; everything in between is evicted. With ``n_sinks = 0`` this is plain window attention
(a truncated context), the baseline that collapses once the first tokens leave the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vmt.memory.cache import CacheState, EvictionPolicy, _check_int, sinks_and_recent


@dataclass(frozen=True)
class StreamingConfig:
    """Hyperparameters of StreamingLLM.

    Attributes:
        budget: maximum number of cached tokens (sinks included).
        n_sinks: attention-sink tokens kept from the start of the stream (paper: 4).
    """

    budget: int
    n_sinks: int = 4

    def __post_init__(self) -> None:
        _check_int("budget", self.budget, 1)
        _check_int("n_sinks", self.n_sinks, 0)
        if self.budget <= self.n_sinks:
            raise ValueError(
                f"budget ({self.budget}) must exceed the sink count ({self.n_sinks}) so that at "
                "least one new token fits"
            )


class StreamingLLM(EvictionPolicy):
    """Keep ``n_sinks`` initial tokens and the most recent ones, ``budget`` tokens in all."""

    def __init__(self, budget: int, n_sinks: int = 4) -> None:
        self.config = StreamingConfig(budget=budget, n_sinks=n_sinks)
        self.budget = self.config.budget
        self.reserved = self.config.n_sinks
        self.name = f"streaming(sinks={n_sinks})" if n_sinks else "window"

    def select(self, state: CacheState, n_incoming: int) -> torch.Tensor:
        n_keep = self.budget - n_incoming
        return sinks_and_recent(len(state), self.config.n_sinks, n_keep)


def window_policy(budget: int) -> StreamingLLM:
    """Truncated context: the newest ``budget`` tokens, no sinks."""
    return StreamingLLM(budget=budget, n_sinks=0)
