"""Neural building blocks: folded (segment-recurrent) transformers and their baselines."""

from vmt.nn.baselines import (
    SegmentCacheConfig,
    SegmentCacheTransformer,
    segment_cache_transformer,
    windowed_transformer,
)
from vmt.nn.folded import FoldedState, FoldedTransformer, FoldedTransformerConfig
from vmt.nn.lm import SegmentLM, Streamer

__all__ = [
    "FoldedState",
    "FoldedTransformer",
    "FoldedTransformerConfig",
    "SegmentCacheConfig",
    "SegmentCacheTransformer",
    "SegmentLM",
    "Streamer",
    "segment_cache_transformer",
    "windowed_transformer",
]
