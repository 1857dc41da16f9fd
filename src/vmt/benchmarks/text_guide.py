"""``vmt bench text-guide``: which reader makes the better guide of the token-family text VMT?

The same generative model (the ``text-token`` preset: memory plus token slot, SmolLM2
distillation) is fitted on one split of the default corpus with the same schedule, with a
guide that reads frozen SmolLM2-135M features in reverse (cached), a GRU reverse reader
trained from scratch, and a folded (segment-recurrent) transformer reverse reader trained
from scratch. Each reader is tried with both memory guides of the token family
(:mod:`vmt.models.tokens`):

* ``memory_guide="features"``: the features shift and rescale every memory step, so the
  reader informs every position;
* ``memory_guide="model"`` (the preset's default): the memory follows the model's own step,
  and the features inform only the first state of a fresh start (one position per document
  in the windows regime, where the state is carried across windows).

Reported: held-out IWAE-k per token over SmolLM2's full vocabulary (``<unk>`` correction
included), with 95% bootstrap intervals over held-out documents, the paired difference to the
GRU reader with the same memory guide, KL per token, and the training CPU time.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from vmt.benchmarks.report import BenchResult, markdown_table

NAME = "text-guide"
SUMMARY = "held-out IWAE/token on pydoc: SmolLM2-feature guide vs GRU and folded guides from scratch"

logger = logging.getLogger(__name__)

PRESET = "text-token"
SCHEDULE = "token-demo"

READERS = {
    "smollm2": ("SmolLM2 features (frozen, layer 12)", {"kind": "lm", "layer": 12, "window": 128, "overlap": True}),
    "gru": ("GRU from scratch", {"kind": "gru", "hidden": 128, "window": 128}),
    "folded": ("Folded transformer from scratch (l = 16)",
               {"kind": "folded", "hidden": 128, "segment": 16, "window": 128}),
}
MEMORY_GUIDES = ("features", "model")


def _setup(steps: int, train_tokens: int, test_tokens: int, particles: int):
    from vmt import experiment

    base = experiment.load_json(experiment.resolve_config(PRESET, "models"))
    schedule = experiment.Schedule.from_dict(experiment.load_json(experiment.resolve_config(SCHEDULE, "inference")))
    train = replace(schedule.train, steps=steps, checkpoint_every=steps, log_every=max(1, steps // 50),
                    lr_decay_steps=steps if schedule.train.lr_decay_steps else 0)
    schedule = replace(schedule, train=train, max_train_tokens=train_tokens, max_test_tokens=test_tokens,
                       eval_particles=particles, reverse_steps=0)
    return base, schedule


def compare(steps: int, train_tokens: int, test_tokens: int, particles: int):
    """Fit every (memory guide, reader) pair; ``(rows, metrics, curves, runs)``.

    ``runs[(guide, reader)]`` is a :class:`vmt.benchmarks.text_lm.Row` of per-document
    held-out IWAE NLL (nats summed) with ``extra`` diagnostics.
    """
    import pyro

    from vmt import experiment
    from vmt.benchmarks.text_lm import Row

    base, schedule = _setup(steps, train_tokens, test_tokens, particles)
    runs, curves = {}, {}
    for guide in MEMORY_GUIDES:
        for key, (label, encoder) in READERS.items():
            preset = experiment.ModelPreset.from_dict({
                "encoder": encoder, "vocab_max_size": base.get("vocab_max_size", 4096),
                "vmt": {**base["vmt"], "memory_guide": guide}})
            logger.info("text-guide: memory guide %s, reader %s", guide, key)
            pyro.set_rng_seed(schedule.train.seed)
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                result = experiment.run_text(preset, schedule, out, resume=False, progress=False)
                elapsed = time.perf_counter() - t0
            test = result.test
            docs = sorted(test.per_document, key=lambda d: d.index)
            history = result.train.history
            extra = {"iwae": test.iwae_per_token, "neg_elbo": test.neg_elbo_per_token,
                     "kl": test.kl_per_token, "explained_dims": test.explained_dims,
                     "state_dim": result.model.config.state_dim,
                     "cpu_seconds": history[-1]["cpu_seconds"] if history else 0.0,
                     "wall_seconds": elapsed,
                     "tokens_per_second": history[-1]["tokens_per_second"] if history else 0.0}
            runs[(guide, key)] = Row(label, f"{key}_{guide}", np.array([d.neg_iwae for d in docs]),
                                     np.array([d.tokens for d in docs], dtype=np.float64), "", extra)
            curves[(guide, key)] = history
    return runs, curves, schedule


def summarise(runs: dict, curves: dict, schedule, figure_dir: Path, quick: bool) -> BenchResult:
    from vmt.benchmarks.text_lm import bootstrap_indices, difference_interval, ratio_interval

    first = next(iter(runs.values()))
    draws = bootstrap_indices(len(first.tokens))
    rows, metrics = [], {}
    for (guide, key), row in runs.items():
        lo, hi = ratio_interval(row.nll, row.tokens, draws)
        name = f"{key}_{guide}"
        metrics[f"iwae_per_token_{name}"] = row.per_token
        metrics[f"iwae_per_token_{name}_ci_low"], metrics[f"iwae_per_token_{name}_ci_high"] = lo, hi
        metrics[f"kl_per_token_{name}"] = row.extra["kl"]
        metrics[f"train_cpu_seconds_{name}"] = row.extra["cpu_seconds"]
        diff = "–"
        if key != "gru":
            d, dlo, dhi = difference_interval(row, runs[(guide, "gru")], draws)
            metrics[f"gain_{key}_vs_gru_{guide}"] = -d
            metrics[f"gain_{key}_vs_gru_{guide}_ci_low"], metrics[f"gain_{key}_vs_gru_{guide}_ci_high"] = -dhi, -dlo
            diff = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
        rows.append([f"`{guide}`", row.label, row.per_token, f"[{lo:.3f}, {hi:.3f}]", diff, row.extra["kl"],
                     f"{row.extra['explained_dims']} of {row.extra['state_dim']}", row.extra["cpu_seconds"]])
    figure = _plot(curves, Path(figure_dir) / "text_guide.png")
    particles = schedule.eval_particles
    table = markdown_table(
        ["memory guide", "guide reader", f"held-out IWAE-{particles} / token", "95% interval",
         "minus the GRU reader (paired 95%)", "KL / token", "dims > 0.1 explained", "training CPU s"], rows)
    train = schedule.train
    md = (
        f"{table}\n\n![training curves](figures/{figure.name})\n\n"
        f"The `{PRESET}` generative model and the `{SCHEDULE}` schedule ({train.steps} steps of "
        f"truncated BPTT over whole documents, batch {train.batch_size}, window {train.window}, "
        f"distillation weight {train.distill_weight:g}), at most {schedule.max_train_tokens:,} training tokens "
        f"of `pydoc_data.topics` and {int(first.tokens.sum()):,} held-out tokens in {len(first.tokens)} "
        "documents, split by document. Bounds are nats per token over SmolLM2's full 49,152-token "
        "vocabulary; intervals are 95% percentile bootstraps over held-out documents (the same "
        "draws for every row, so the differences are paired). With `memory_guide=\"model\"` the "
        "reader informs only the first state of each document (the state is carried across "
        "windows); with `\"features\"` the reader shifts every memory step. One training run (seed 0) "
        "per row: the intervals cover the held-out documents, not the training randomness."
    )
    config = {"quick": quick, "steps": train.steps, "train_tokens": schedule.max_train_tokens,
              "test_tokens": int(first.tokens.sum()), "particles": particles, "preset": PRESET,
              "schedule": SCHEDULE}
    return BenchResult(NAME, metrics, config, md, [figure])


def _plot(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEMORY_GUIDES), figsize=(10, 3.5), sharey=True)
    for ax, guide in zip(np.atleast_1d(axes), MEMORY_GUIDES):
        for key, (label, _) in READERS.items():
            hist = curves.get((guide, key), [])
            ax.plot([h["step"] for h in hist], [-h["elbo_per_token"] for h in hist], label=label)
        ax.set_title(f"memory guide: {guide}")
        ax.set_xlabel("SVI step")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("training −ELBO / token (nats)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool, figure_dir: Path) -> BenchResult:
    steps = 30 if quick else 1000
    train_tokens, test_tokens = (3000, 800) if quick else (24000, 100_000)
    particles = 2 if quick else 8
    runs, curves, schedule = compare(steps, train_tokens, test_tokens, particles)
    return summarise(runs, curves, schedule, figure_dir, quick)
