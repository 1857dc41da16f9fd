"""Writing speed after a long context: a VMT against SmolLM2 with its KV cache.

After a context of ``c`` tokens, SmolLM2-135M decodes with its key/value cache: every new
token attends to all ``c`` cached positions, so its cost grows with ``c``. A VMT writes from
its state: one transition and one emission per token, whatever was read before.

Both write ``n`` tokens after the same context (a ``pydoc`` text tokenised with SmolLM2's
tokenizer, repeated to length). The VMT (state 64, linear emission over SmolLM2's 49,152-token
vocabulary, GRU reader; its weights do not change the cost, so it is not fitted here) first
reads the context with a 256-token window; SmolLM2 first pre-fills its cache. Neither
preparation is timed: only the ``n`` decoding steps are, as medians of interleaved repeats in
the same run (greedy decoding for SmolLM2, sampling from the emission for the VMT).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from vmt.benchmarks.report import BenchResult, markdown_table
from vmt.encoders.small_readers import GRUReader
from vmt.hf_compat import cache_kwargs, output_cache
from vmt.inference.generation import write
from vmt.inference.reading import ReadConfig, read
from vmt.models import VMTConfig
from vmt.models.vmt import VariationalMarkovTransformer

NAME = "generation-speed"
SUMMARY = "tokens/s of VMT writing vs SmolLM2 KV-cache decoding after 512 / 2048 / 8192 tokens"

logger = logging.getLogger(__name__)


def context_tokens(tokenizer, length: int) -> torch.Tensor:
    from vmt.data.corpus import pydoc_texts

    ids: list[int] = []
    for text in pydoc_texts():
        ids += tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= length:
            break
    while len(ids) < length:
        ids += ids
    return torch.tensor(ids[:length], dtype=torch.long)


@torch.no_grad()
def lm_decode(lm, past, last: torch.Tensor, n: int) -> float:
    """Seconds for ``n`` greedy KV-cache decoding steps from a pre-filled cache."""
    start = time.perf_counter()
    token = last
    for _ in range(n):
        out = lm(input_ids=token, use_cache=True, **cache_kwargs(lm, past))
        past = output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.no_grad()
def lm_prefill(lm, context: torch.Tensor):
    out = lm(input_ids=context[None, :-1], use_cache=True)
    return output_cache(out), context[None, -1:]


def run(quick: bool, figure_dir: Path) -> BenchResult:
    from vmt.encoders.pretrained import load_pretrained_lm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm, tok = load_pretrained_lm()
    lm.eval()
    vocab = int(lm.config.vocab_size)
    contexts = (512, 2048) if quick else (512, 2048, 8192)
    n = 8 if quick else 16
    repeats = 3
    config = VMTConfig(state_dim=64, obs_dim=vocab, feature_dim=64, guide_hidden=64,
                       transition_hidden=64, max_window=256)
    vmt = VariationalMarkovTransformer(config, reader=GRUReader("tokens", 64, vocab_size=vocab,
                                                                 embed_dim=32))
    vmt.eval()
    rows, metrics = [], {}
    for c in contexts:
        ctx = context_tokens(tok, c)
        state = read(vmt, ctx, ReadConfig(window=256, score=False)).state
        vmt_times, lm_times = [], []
        write(vmt, state, 2)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            write(vmt, state, n)
            vmt_times.append(time.perf_counter() - start)
            past, last = lm_prefill(lm, ctx)
            lm_times.append(lm_decode(lm, past, last, n))
            del past
        vmt_tps = n / statistics.median(vmt_times)
        lm_tps = n / statistics.median(lm_times)
        metrics[f"vmt_tokens_per_second_ctx{c}"] = vmt_tps
        metrics[f"smollm2_tokens_per_second_ctx{c}"] = lm_tps
        metrics[f"vmt_over_smollm2_ctx{c}"] = vmt_tps / lm_tps
        rows.append([c, vmt_tps, lm_tps, vmt_tps / lm_tps])
        logger.info("context %d: VMT %.1f tok/s, SmolLM2 %.1f tok/s", c, vmt_tps, lm_tps)
    first, last_c = contexts[0], contexts[-1]
    metrics["vmt_speed_kept_from_first_to_last_context"] = (
        metrics[f"vmt_tokens_per_second_ctx{last_c}"] / metrics[f"vmt_tokens_per_second_ctx{first}"]
    )
    markdown = "\n\n".join([
        f"Decoding {n} tokens after a context of each length, one CPU thread, medians of "
        f"{repeats} interleaved repeats (pre-fill and reading not timed):",
        markdown_table(["context", "VMT tokens/s", "SmolLM2 (KV cache) tokens/s", "ratio"], rows),
        "The VMT's cost per token is one transition and one emission over the 49,152-token "
        "vocabulary; it does not depend on how much was read. SmolLM2's cost per token grows "
        "with the cache it attends to. The VMT does the same computation after every "
        "context, so differences down its column are load noise on a shared machine (the "
        "two models are timed alternately, so a load change hits both). This is a statement "
        "about cost only: the VMT here is "
        "not fitted, and a fitted VMT's state summarises its context far less well than a "
        "full KV cache does.",
    ])
    return BenchResult(NAME, metrics, {"quick": quick, "contexts": list(contexts), "tokens": n,
                                       "repeats": repeats}, markdown=markdown)
