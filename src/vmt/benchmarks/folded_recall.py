"""Associative recall at long distance: folded vs windowed vs one-segment cache, and streaming.

Three segment stacks with the same blocks (``l = 16``, width 64, 4 heads, 4 blocks: the
folded model uses 2 local + 2 global) get the same training stream of recall sequences
(same sequences, same optimiser, same number of steps) and are then evaluated with one query
at each distance ``d`` in {32, 64, 128, 256, 512}. A second part streams a folded model one
segment at a time over 64k tokens and reports per-token time and process memory at 1k, 4k,
16k and 64k tokens as ratios to the values at 1k.

A VMT row reads the same training sequences, each once (the same number of sequences seen),
with every query's answer written after it (:func:`~vmt.data.synthetic_recall.write_answers`:
a generative model learns to answer from the stream itself). It is the token family (a noisy
recurrent language model written as a hidden Markov model, :mod:`vmt.models.tokens`) trained in
the windows regime: windows of ``2l = 32`` tokens, the state carried from window to window and
detached (truncated backpropagation). It answers a query with its own predictive distribution
given the state read up to the query (window 32, the state carried across windows; the other
queries of the evaluation sequence turned to filler, :func:`~vmt.data.synthetic_recall.single_query`),
the most probable value being its answer. Each model's carried memory at batch 1 is reported
in bytes beside its accuracy.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vmt.benchmarks.report import BenchResult, markdown_table, wilson_interval
from vmt.data.synthetic_recall import (
    RecallTaskConfig,
    sample_eval_batch,
    sample_training_batch,
    single_query,
    write_answers,
)
from vmt.nn.baselines import segment_cache_transformer, windowed_transformer
from vmt.nn.folded import FoldedTransformer, FoldedTransformerConfig
from vmt.nn.lm import SegmentLM, TrainConfig, train

NAME = "folded-recall"
SUMMARY = "long-range recall accuracy (folded vs windowed vs 1-segment cache vs VMT) and streaming cost"

logger = logging.getLogger(__name__)

SEGMENT = 16
DISTANCES = [32, 64, 128, 256, 512]
WIDTH = dict(d_model=64, n_heads=4, d_ff=128)
TASK = RecallTaskConfig(n_pairs=1, n_keys=16, n_values=16, n_filler=16)
MODELS = ("folded", "windowed", "cache")
ROWS = MODELS + ("vmt",)
LR = 3e-3
WARMUP = 10
QUERY_PROB = 0.3

# the VMT row: token family, memory 128 + token slot 16, read and trained in windows of 2l
VMT_WINDOW = 2 * SEGMENT
VMT_MEMORY = 128
VMT_TOKEN = 16
VMT_SAMPLES = 16  # rows of the read state (particles of the predictive)
LABELS = {"folded": "folded (2 local + 2 global)", "windowed": "windowed (window 2l)",
          "cache": "1-segment cache (XL)", "vmt": "VMT (window 2l, state carried)"}


def build(kind: str, vocab: int) -> SegmentLM:
    """The three stacks with matched blocks (parameter counts differ by the bias tables)."""
    if kind == "folded":
        body = FoldedTransformer(
            FoldedTransformerConfig(segment_length=SEGMENT, n_local=2, n_global=2,
                                    vocab_size=vocab, **WIDTH)
        )
    elif kind == "windowed":
        body = windowed_transformer(SEGMENT, n_layers=4, vocab_size=vocab, **WIDTH)
    elif kind == "cache":
        body = segment_cache_transformer(SEGMENT, n_layers=4, vocab_size=vocab, **WIDTH)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return SegmentLM(body, vocab)


def curriculum_length(step: int, steps: int, max_length: int, ramp: float) -> int:
    """Training length grows linearly from one segment to ``max_length`` over ``ramp``."""
    lo = 2 * TASK.n_pairs + SEGMENT
    frac = min(1.0, step / max(1.0, ramp * steps))
    return int(lo + (max_length - lo) * frac)


def training_stream(seed: int, steps: int, batch: int, max_length: int):
    """``batches(step) -> (tokens, targets)``: the training stream every model sees (called
    once per step, in order)."""
    data = torch.Generator().manual_seed(10_000 + seed)  # same stream for every model

    def batches(step: int):
        length = curriculum_length(step, steps, max_length, ramp=0.6)
        return sample_training_batch(TASK, batch, length, QUERY_PROB, data)

    return batches


def train_and_evaluate(kind: str, seed: int, steps: int, batch: int, max_length: int,
                       n_eval: int) -> dict[int, float]:
    torch.manual_seed(seed)
    lm = build(kind, TASK.vocab_size)
    batches = training_stream(seed, steps, batch, max_length)
    train(lm, batches, TrainConfig(steps=steps, lr=LR, warmup=WARMUP), log_every=0)

    def answers(tokens, targets, qpos):
        return (lm(tokens).argmax(-1).gather(1, qpos) == targets.gather(1, qpos)).float().sum(0)

    return accuracy(seed, n_eval, answers)


def accuracy(seed: int, n_eval: int, answers) -> dict[int, float]:
    """Recall accuracy per distance on ``n_eval`` evaluation sequences, the same for every
    model of a seed; ``answers(tokens, targets, query_pos)`` gives the ``(distances,)``
    number of queries a batch answered right."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    correct = torch.zeros(len(DISTANCES))
    done = 0
    with torch.no_grad():
        while done < n_eval:
            b = min(128, n_eval - done)
            correct += answers(*sample_eval_batch(TASK, b, DISTANCES, gen))
            done += b
    return {d: float(c) / n_eval for d, c in zip(DISTANCES, correct, strict=True)}


def build_vmt(vocab: int):
    """The VMT of the recall row (:func:`vmt.models.vmt.token_rnn_vmt`)."""
    from vmt.models.vmt import token_rnn_vmt

    return token_rnn_vmt(vocab, VMT_MEMORY, VMT_TOKEN, WIDTH["d_model"], VMT_WINDOW)


def train_and_evaluate_vmt(seed: int, steps: int, batch: int, max_length: int,
                           n_eval: int) -> tuple[dict[int, float], dict]:
    """The VMT row: one pass over the same training sequences with answers written in, then
    recall accuracy per distance on the same evaluation sequences as the other rows; also the
    training record (steps, CPU seconds, bound)."""
    from vmt.inference.predictive import next_token_probs
    from vmt.inference.reading import ReadConfig, read
    from vmt.inference.train import TrainConfig as VMTTrainConfig
    from vmt.inference.train import fit
    from vmt.inference.windows import DocumentStreams

    torch.manual_seed(seed)
    batches = training_stream(seed, steps, batch, max_length)
    docs = [row for step in range(steps) for row in write_answers(*batches(step))]
    vmt = build_vmt(TASK.vocab_size)
    passes = len(DocumentStreams(docs, batch, VMT_WINDOW).window_lengths())  # every sequence once
    t0 = time.process_time()
    result = fit(vmt, docs, VMTTrainConfig(
        regime="windows", window=VMT_WINDOW, batch_size=batch, steps=passes, learning_rate=LR,
        lr_decay_steps=passes, lr_final_fraction=0.1, aux_weight=0.0, max_skip=0,
        log_every=max(1, passes // 10), seed=seed), progress=False)
    if not result.ok:
        raise RuntimeError(f"VMT training (seed {seed}) stopped: {result.stopped}")
    record = {"steps": passes, "cpu_seconds": time.process_time() - t0,
              "neg_elbo_per_token": -result.history[-1]["elbo_per_token"]}
    vmt.eval()
    fillers = torch.Generator().manual_seed(30_000 + seed)  # for the queries turned to filler
    values = torch.arange(TASK.value_offset, TASK.value_offset + TASK.n_values)
    read_config = ReadConfig(window=VMT_WINDOW, score=False)

    def answers(tokens, targets, qpos):
        right = torch.zeros(len(DISTANCES))
        for r in range(tokens.shape[0]):
            for j in range(len(DISTANCES)):
                prefix = single_query(TASK, tokens[r], qpos[r], j, fillers)
                state = read(vmt, prefix, read_config, samples=VMT_SAMPLES).state
                guess = values[next_token_probs(vmt, state)[values].argmax()]
                right[j] += float(guess == targets[r, qpos[r, j]])
        return right

    return accuracy(seed, n_eval, answers), record


def carried_bytes(kind: str) -> float:
    """Bytes a model carries from one segment (or window) to the next at batch 1."""
    if kind == "vmt":
        return float(VMT_SAMPLES * (VMT_MEMORY + VMT_TOKEN) * 4)  # float32 state rows
    body = build(kind, TASK.vocab_size).body.eval()
    with torch.no_grad():
        _, state = body.step(torch.zeros(1, SEGMENT, dtype=torch.long), body.initial_state(1))
    return float(state.nbytes())


def _rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def streaming_profile(total: int, block: int = 1024) -> dict[str, list[float]]:
    """Stream a folded model over ``total`` tokens one segment at a time (batch 1).

    Returns per-block wall time per token, resident memory and carried-state bytes at the end
    of every block of ``block`` tokens.
    """
    torch.manual_seed(0)
    model = build("folded", TASK.vocab_size).body.eval()
    gen = torch.Generator().manual_seed(1)
    state = model.initial_state(1)
    ends, per_token, rss, state_bytes = [], [], [], []
    with torch.no_grad():
        for start in range(0, total, block):
            tokens = torch.randint(TASK.vocab_size, (1, block), generator=gen)
            t0 = time.perf_counter()
            for s in range(0, block, SEGMENT):
                _, state = model.step(tokens[:, s : s + SEGMENT], state)
            per_token.append((time.perf_counter() - t0) / block)
            ends.append(start + block)
            rss.append(_rss_bytes())
            state_bytes.append(float(state.nbytes()))
    return {"end": ends, "per_token": per_token, "rss": rss, "state_bytes": state_bytes}


def _near(profile: dict[str, list[float]], key: str, length: int, k: int = 3) -> float:
    """Median of ``key`` over the ``k`` blocks ending at or just before ``length``."""
    idx = [i for i, e in enumerate(profile["end"]) if e <= length][-k:]
    vals = sorted(profile[key][i] for i in idx)
    return vals[len(vals) // 2]


def _recall_rows(settings: dict, metrics: dict) -> tuple[dict, list[dict]]:
    """Train and score every row for every seed: accuracies per row and seed, the VMT's
    training records; parameters, carried bytes and accuracies go into ``metrics``."""
    acc: dict[str, list[dict[int, float]]] = {k: [] for k in ROWS}
    t_train, vmt_records = {}, []
    for kind in ROWS:
        model = build_vmt(TASK.vocab_size) if kind == "vmt" else build(kind, 40)
        metrics[f"params_{kind}"] = float(sum(p.numel() for p in model.parameters()))
        metrics[f"carried_bytes_{kind}"] = carried_bytes(kind)
        t0 = time.perf_counter()
        for seed in settings["seeds"]:
            if kind == "vmt":
                res, record = train_and_evaluate_vmt(seed, settings["steps"], settings["batch"],
                                                     settings["max_length"], settings["n_eval"])
                vmt_records.append(record)
                for key, value in record.items():
                    metrics[f"vmt_{key}_seed{seed}"] = float(value)
            else:
                res = train_and_evaluate(kind, seed, settings["steps"], settings["batch"],
                                         settings["max_length"], settings["n_eval"])
            acc[kind].append(res)
            logger.info("%s seed %d: %s", kind, seed, res)
            for d in DISTANCES:
                metrics[f"acc_{kind}_d{d}_seed{seed}"] = res[d]
        t_train[kind] = time.perf_counter() - t0
        for d in DISTANCES:
            metrics[f"acc_{kind}_d{d}"] = sum(r[d] for r in acc[kind]) / len(acc[kind])
    metrics["train_time_ratio_folded_over_windowed"] = t_train["folded"] / t_train["windowed"]

    trials = settings["n_eval"] * len(settings["seeds"])  # queries per distance, pooled
    for kind in ROWS:
        for d in DISTANCES:
            lo, hi = wilson_interval(round(metrics[f"acc_{kind}_d{d}"] * trials), trials)
            metrics[f"acc_{kind}_d{d}_lo"], metrics[f"acc_{kind}_d{d}_hi"] = lo, hi
    return acc, vmt_records


def _streaming(settings: dict, metrics: dict) -> tuple[dict, list[int], float, float]:
    """The folded model's streaming profile, its ratios to the values at 3k tokens in
    ``metrics``; returns the profile, the lengths reported and the two bases."""
    prof = streaming_profile(settings["stream_tokens"])
    lengths = [n for n in (1024, 4096, 16384, 65536) if n <= settings["stream_tokens"]]
    base_t = _near(prof, "per_token", 1024 * 3)  # blocks 1-3: after the first warm-up
    base_rss = _near(prof, "rss", 1024 * 3)
    for n in lengths[1:]:
        tag = f"{n // 1024}k"
        metrics[f"stream_time_per_token_ratio_{tag}_vs_3k"] = _near(prof, "per_token", n) / base_t
        metrics[f"stream_rss_ratio_{tag}_vs_3k"] = _near(prof, "rss", n) / base_rss
    metrics["stream_state_bytes_ratio_last_vs_first"] = prof["state_bytes"][-1] / prof[
        "state_bytes"][0]

    return prof, lengths, base_t, base_rss


def _figure(acc: dict, metrics: dict, prof: dict, base_t: float, base_rss: float, figure_dir: Path) -> Path:
    """Recall against distance per row, and the streaming ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, marker in zip(ROWS, "osd^", strict=True):
        mean = [metrics[f"acc_{kind}_d{d}"] for d in DISTANCES]
        (line,) = axes[0].plot(DISTANCES, mean, marker=marker, label=LABELS[kind])
        for r in acc[kind]:
            axes[0].scatter(DISTANCES, [r[d] for d in DISTANCES], color=line.get_color(),
                            alpha=0.35, s=12)
    axes[0].axhline(TASK.chance, color="grey", ls=":", label="chance")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("query distance d (tokens)")
    axes[0].set_ylabel("recall accuracy")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"recall, l = {SEGMENT}")
    ends = prof["end"]
    axes[1].plot(ends, [t / base_t for t in prof["per_token"]], label="time per token")
    axes[1].plot(ends, [r / base_rss for r in prof["rss"]], label="process memory (RSS)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("tokens streamed")
    axes[1].set_ylabel("ratio to the value at 3k tokens")
    axes[1].set_ylim(0, max(2.0, max(t / base_t for t in prof["per_token"]) * 1.05))
    axes[1].legend(fontsize=8)
    axes[1].set_title("folded streaming, one segment per step")
    fig.tight_layout()
    fig_path = figure_dir / "folded_recall.png"
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)

    return fig_path


def _markdown(settings: dict, metrics: dict, acc: dict, vmt_records: list[dict], lengths: list[int]) -> str:
    """The page's section: the recall table with intervals, what each row did, streaming."""
    acc_rows = []
    trials = settings["n_eval"] * len(settings["seeds"])
    for kind in ROWS:
        row = [LABELS[kind], int(metrics[f"params_{kind}"]), int(metrics[f"carried_bytes_{kind}"])]
        for d in DISTANCES:
            per_seed = "/".join(f"{r[d]:.2f}" for r in acc[kind])
            mean, lo, hi = (metrics[f"acc_{kind}_d{d}{end}"] for end in ("", "_lo", "_hi"))
            row.append(f"{mean:.3f} [{lo:.2f}, {hi:.2f}] ({per_seed})")
        acc_rows.append(row)
    vmt_cpu = sum(r["cpu_seconds"] for r in vmt_records) / len(vmt_records)
    vmt_bound = sum(r["neg_elbo_per_token"] for r in vmt_records) / len(vmt_records)
    stream_rows = [
        [f"{n // 1024}k",
         f"{metrics[f'stream_time_per_token_ratio_{n // 1024}k_vs_3k']:.3f}",
         f"{metrics[f'stream_rss_ratio_{n // 1024}k_vs_3k']:.3f}"]
        for n in lengths[1:]
    ]
    folded256 = metrics["acc_folded_d256"]
    windowed256 = metrics["acc_windowed_d256"]
    return "\n\n".join([
        f"Recall with {TASK.n_pairs} key-value pair(s) at the start of the sequence, "
        f"random filler, and one query at each distance d (chance "
        f"{TASK.chance:.3f}). Segment length l = {SEGMENT}; all models width 64, 4 heads, "
        f"4 blocks (folded: 2 local + 2 global). Each model saw the same "
        f"{settings['steps']} batches of {settings['batch']} training sequences "
        f"(length ramped from {curriculum_length(0, 1, 0, 1.0)} to {settings['max_length']} "
        f"tokens over 60% of the steps, 30% of filler slots "
        f"turned into queries), AdamW lr 3e-3, seeds {settings['seeds']}; accuracy on "
        f"{settings['n_eval']} fresh sequences per seed. Cells: mean over seeds "
        f"[95% Wilson interval of the {trials} pooled queries] (per-seed values); carried "
        f"memory: bytes a model keeps from one segment to the next at batch 1 (the VMT: "
        f"{VMT_SAMPLES} rows of a {VMT_MEMORY + VMT_TOKEN}-number float32 state).",
        markdown_table(["model", "params", "carried bytes"] + [f"d={d}" for d in DISTANCES],
                       acc_rows),
        "![](figures/folded_recall.png)",
        f"At d = 256 the folded transformer reached {folded256:.3f} and the windowed "
        f"transformer {windowed256:.3f} (chance {TASK.chance:.3f}). The windowed model "
        f"(4 layers x window {2 * SEGMENT}) and the one-segment cache cannot see beyond "
        f"{4 * (2 * SEGMENT - 1)} tokens, so beyond that they can only guess; the folded "
        f"model must carry the "
        f"pairs through d/16 segment hops. Training sequences were at most "
        f"{settings['max_length']} tokens long, so d = 512 also measures length "
        f"generalisation of the carry. Folded training took "
        f"{metrics['train_time_ratio_folded_over_windowed']:.2f}x the wall time of the "
        f"windowed model (its global stack is sequential over segments).",
        f"The VMT read the same sequences once each with every query's answer written after "
        f"it ({int(sum(r['steps'] for r in vmt_records) / len(vmt_records))} windows-regime "
        f"steps of {settings['batch']} streams x {VMT_WINDOW} tokens, the documents longest "
        f"first, the state carried and detached between windows; Adam lr {LR} with a cosine "
        f"decay to a tenth, no KL annealing), {vmt_cpu:.0f} CPU-s of training per seed on one thread, ending at a "
        f"training bound of {vmt_bound:.3f} nats/token. It is the token family with memory "
        f"{VMT_MEMORY} and token slot {VMT_TOKEN}, and its guide's memory step is the "
        f"model's own: a noisy recurrent language model, so what it recalls beyond its "
        f"{VMT_WINDOW}-token window it recalls through the state. At evaluation it reads each "
        f"query's prefix with a {VMT_WINDOW}-token window, the other queries turned to filler "
        f"(they would be unanswered queries, a stream it never saw), and answers with the "
        f"most probable value under its predictive distribution "
        f"({VMT_SAMPLES} state samples). At d = 256 it reached {metrics['acc_vmt_d256']:.3f}.",
        "Streaming: a folded model (batch 1) reads "
        f"{settings['stream_tokens'] // 1024}k random tokens one segment per call; wall time "
        "per token and resident process memory are taken per block of 1024 tokens (median "
        "of the three blocks ending at each length) and divided by the values at 3k tokens, "
        "measured in the same run. The carried state has a fixed size "
        f"(ratio last/first {metrics['stream_state_bytes_ratio_last_vs_first']:.1f}). "
        "Wall-time ratios on a shared machine scatter by tens of percent with the load of "
        "other processes; what they show is the absence of a trend with length, where a "
        "full-attention model's per-token cost would grow linearly.",
        markdown_table(["tokens", "time per token / at 3k", "RSS / at 3k"], stream_rows),
    ])


def run(quick: bool, figure_dir: Path) -> BenchResult:
    torch.set_num_threads(1)
    settings = (
        dict(seeds=[0], steps=250, batch=32, max_length=136, n_eval=128, stream_tokens=16384)
        if quick
        else dict(seeds=[0, 1, 2], steps=400, batch=32, max_length=200, n_eval=512,
                  stream_tokens=65536)
    )
    metrics: dict[str, float] = {"chance_accuracy": TASK.chance}
    acc, vmt_records = _recall_rows(settings, metrics)
    prof, lengths, base_t, base_rss = _streaming(settings, metrics)
    fig_path = _figure(acc, metrics, prof, base_t, base_rss, figure_dir)
    markdown = _markdown(settings, metrics, acc, vmt_records, lengths)
    return BenchResult(
        benchmark=NAME,
        metrics=metrics,
        config={"quick": quick, "segment_length": SEGMENT, "distances": DISTANCES,
                "task": asdict(TASK), **WIDTH, **settings,
                "vmt": {"memory": VMT_MEMORY, "token": VMT_TOKEN, "window": VMT_WINDOW,
                        "samples": VMT_SAMPLES}},
        markdown=markdown,
        figures=[fig_path],
    )


