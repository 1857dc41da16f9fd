"""Fixed-budget KV-cache baselines for streaming input: StreamingLLM and SirLLM.

* :mod:`vmt.memory.rope` — re-rotation of RoPE-embedded cached keys to new slots.
* :mod:`vmt.memory.cache` — cache compaction and the :class:`EvictionPolicy` interface.
* :mod:`vmt.memory.streaming` — StreamingLLM (sinks + recent window) and plain windows.
* :mod:`vmt.memory.sirllm` — SirLLM (sinks + highest decayed surprisal).
* :mod:`vmt.memory.decoding` — the streaming loop (:class:`KVStream`), option scoring,
  streaming perplexity.
* :mod:`vmt.memory.tasks` — seeded long-memory tasks generated locally.
* :mod:`vmt.memory.task_corpus` — training streams in the tasks' formats (other seeds).
"""

from vmt.memory.cache import CacheState, EvictionPolicy, FullContext, cache_length, compact_cache
from vmt.memory.decoding import Choice, FeedOutput, KVStream, streaming_nll
from vmt.memory.rope import check_supported_model, inverse_frequencies, rerotate_keys
from vmt.memory.sirllm import SirLLM, SirLLMConfig, paper_surprisal, reference_surprisal
from vmt.memory.streaming import StreamingConfig, StreamingLLM, window_policy

__all__ = [
    "CacheState",
    "Choice",
    "EvictionPolicy",
    "FeedOutput",
    "FullContext",
    "KVStream",
    "SirLLM",
    "SirLLMConfig",
    "StreamingConfig",
    "StreamingLLM",
    "cache_length",
    "check_supported_model",
    "compact_cache",
    "inverse_frequencies",
    "paper_surprisal",
    "reference_surprisal",
    "rerotate_keys",
    "streaming_nll",
    "window_policy",
]
