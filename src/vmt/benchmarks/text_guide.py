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

**The scan guide against the gated guide** (the second table). The Gaussian-family preset
``text-smollm2`` (guide reading cached SmolLM2 features) is fitted on the same split with the
``demo`` schedule (subsequence regime) twice: with ``guide="gaussian"`` (the gated guide, the
preset's default) and with ``guide="affine"`` (affine in the state, path sampled by a parallel
scan, :mod:`vmt.models.scan`). Both train for the same CPU seconds of SVI on one thread
(:attr:`vmt.inference.train.TrainConfig.max_cpu_seconds`, :data:`GUIDE_SECONDS` or
``$VMT_TEXT_GUIDE_SECONDS``; the step limit lies far beyond the budget, so the budget ends both
runs and the faster guide takes more steps). Reported: held-out IWAE-k and −ELBO per token with
95% bootstrap intervals over held-out documents, the paired difference affine − gated, KL per
token, explained dimensions, SVI steps and steps per CPU second, and a verdict generated from the
numbers: the scan guide becomes the default only if it is at least as good on IWAE-k (paired
difference ≤ 0 and its interval not wholly above 0).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from vmt.benchmarks.report import BenchResult, markdown_table

NAME = "text-guide"
SUMMARY = ("held-out IWAE/token on pydoc: SmolLM2-feature guide vs GRU and folded guides from scratch; "
           "scan vs gated guide of text-smollm2 at equal CPU time")

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

GUIDE_PRESET = "text-smollm2"
GUIDE_SCHEDULE = "demo"
GUIDES = (("gaussian", "gated (GRU-style combiner)"),
          ("affine", "scan (affine in the state, parallel scan)"))
GUIDE_SECONDS = 360.0
GUIDE_STEP_FACTOR = 100  # the step limit, in multiples of the schedule's steps


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


# -- the scan guide against the gated guide (text-smollm2, equal CPU time) ---------------------
def _guide_setup(quick: bool, train_tokens: int, test_tokens: int, particles: int):
    """The ``text-smollm2`` preset and the ``demo`` schedule both guides train with: a CPU
    budget of ``seconds`` (``$VMT_TEXT_GUIDE_SECONDS``, default :data:`GUIDE_SECONDS`; 4 s in
    quick mode) and a step limit a hundred times the schedule's, so the budget ends both runs."""
    from vmt import experiment

    base = experiment.load_json(experiment.resolve_config(GUIDE_PRESET, "models"))
    schedule = experiment.Schedule.from_dict(
        experiment.load_json(experiment.resolve_config(GUIDE_SCHEDULE, "inference")))
    seconds = 4.0 if quick else float(os.environ.get("VMT_TEXT_GUIDE_SECONDS", GUIDE_SECONDS))
    steps = GUIDE_STEP_FACTOR * schedule.train.steps
    train = replace(schedule.train, steps=steps, max_cpu_seconds=seconds, checkpoint_every=steps,
                    log_every=5 if quick else 20)
    schedule = replace(schedule, train=train, max_train_tokens=train_tokens, max_test_tokens=test_tokens,
                       eval_particles=particles, reverse_steps=0)
    return base, schedule, seconds


def guide_comparison(quick: bool, train_tokens: int, test_tokens: int, particles: int):
    """Fit ``text-smollm2`` with each guide of :data:`GUIDES` for the same CPU seconds (one
    thread, seed 0); ``(runs, curves, schedule, seconds, default)``.

    ``runs[guide]`` is a pair of :class:`vmt.benchmarks.text_lm.Row` (per-document held-out
    IWAE-k and −ELBO, nats summed) with ``extra`` diagnostics; ``default`` is the preset's guide.
    """
    import pyro
    import torch

    from vmt import experiment
    from vmt.benchmarks.text_lm import Row

    base, schedule, seconds = _guide_setup(quick, train_tokens, test_tokens, particles)
    runs, curves = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the budget is CPU time of one thread
    try:
        for guide, label in GUIDES:
            preset = experiment.ModelPreset.from_dict({**base, "vmt": {**base["vmt"], "guide": guide}})
            logger.info("text-guide: %s with guide %s for %.0f CPU s", GUIDE_PRESET, guide, seconds)
            pyro.set_rng_seed(schedule.train.seed)
            with tempfile.TemporaryDirectory() as out:
                result = experiment.run_text(preset, schedule, out, resume=False, progress=False)
            test, train = result.test, result.train
            docs = sorted(test.per_document, key=lambda d: d.index)
            tokens = np.array([d.tokens for d in docs], dtype=np.float64)
            extra = {"iwae": test.iwae_per_token, "neg_elbo": test.neg_elbo_per_token, "kl": test.kl_per_token,
                     "explained_dims": test.explained_dims, "state_dim": result.model.config.state_dim,
                     "steps": train.steps, "cpu_seconds": train.cpu_seconds, "stopped": train.stopped}
            runs[guide] = (Row(label, f"{guide}_iwae", np.array([d.neg_iwae for d in docs]), tokens, "", extra),
                           Row(label, f"{guide}_neg_elbo", np.array([d.neg_elbo for d in docs]), tokens, "", extra))
            curves[guide] = train.history
    finally:
        torch.set_num_threads(threads)
    return runs, curves, schedule, seconds, base["vmt"].get("guide", "gaussian")


def at_least_as_good(difference: float, low: float) -> bool:
    """The rule for a new default: the paired difference (new − old, nats per token) is not
    positive and its interval does not lie wholly above 0."""
    return difference <= 0 and low <= 0


def _verdict(d: float, lo: float, hi: float, particles: int, default: str) -> tuple[bool, str]:
    """The result in words from the paired IWAE difference affine − gated, and the default."""
    ahead, behind = ("scan", "gated") if d < 0 else ("gated", "scan")
    excludes = lo > 0 or hi < 0
    text = (f"On held-out IWAE-{particles} the {ahead} guide is ahead of the {behind} guide by "
            f"{abs(d):.3f} nats per token (affine − gated {d:+.3f}, paired 95% interval "
            f"[{lo:+.3f}, {hi:+.3f}], which {'excludes' if excludes else 'includes'} 0"
            f"{'' if excludes else ': the held-out documents do not separate the two'}).")
    good = at_least_as_good(d, lo)
    if good and default == "affine":
        text += " The scan guide is at least as good, so it stays the preset's default (`guide=\"affine\"`)."
    elif good:
        text += (" The scan guide is at least as good (difference ≤ 0, interval not above 0), so it "
                 "becomes the default of the preset (`guide=\"affine\"`).")
    else:
        text += (" The scan guide is not at least as good (the rule: difference ≤ 0 and its interval not "
                 "wholly above 0), so the default "
                 f"{'stays' if default != 'affine' else 'goes back to'} gated (`guide=\"gaussian\"`).")
    return good, text


def guide_summary(runs: dict, curves: dict, schedule, seconds: float, default: str,
                  figure_dir: Path) -> tuple[str, dict, dict, Path]:
    """The second table, its notes and verdict, metrics, config and figure."""
    from vmt.benchmarks.text_lm import bootstrap_indices, difference_interval, ratio_interval

    first = GUIDES[0][0]
    draws = bootstrap_indices(len(runs[first][0].tokens))
    particles = schedule.eval_particles
    rows, metrics = [], {}
    verdict = None
    for guide, label in GUIDES:
        cells = []
        for i, key in enumerate(("iwae", "neg_elbo")):
            row, base = runs[guide][i], runs[first][i]
            lo, hi = ratio_interval(row.nll, row.tokens, draws)
            name = f"{guide}_{key}" if key == "neg_elbo" else f"{guide}_iwae{particles}"
            metrics[f"scan_guide_{name}_per_token"] = row.per_token
            metrics[f"scan_guide_{name}_ci_low"], metrics[f"scan_guide_{name}_ci_high"] = lo, hi
            cell = "–"
            if guide != first:
                d, dlo, dhi = difference_interval(row, base, draws)
                cell = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
                what = f"iwae{particles}" if key == "iwae" else key
                metrics[f"scan_guide_affine_minus_gated_{what}"] = d
                metrics[f"scan_guide_affine_minus_gated_{what}_ci_low"] = dlo
                metrics[f"scan_guide_affine_minus_gated_{what}_ci_high"] = dhi
                if key == "iwae":
                    verdict = _verdict(d, dlo, dhi, particles, default)
            cells += [f"{row.per_token:.3f} [{lo:.3f}, {hi:.3f}]", cell]
        extra = runs[guide][0].extra
        rate = extra["steps"] / max(extra["cpu_seconds"], 1e-9)
        metrics[f"scan_guide_{guide}_kl_per_token"] = extra["kl"]
        metrics[f"scan_guide_{guide}_steps"] = extra["steps"]
        metrics[f"scan_guide_{guide}_steps_per_cpu_second"] = rate
        metrics[f"scan_guide_{guide}_train_cpu_seconds"] = extra["cpu_seconds"]
        rows.append([f"`{guide}`: {label}", *cells, extra["kl"], f"{extra['explained_dims']} of {extra['state_dim']}",
                     extra["steps"], round(rate, 2), round(extra["cpu_seconds"], 1)])
    good, words = verdict
    metrics["scan_guide_at_least_as_good"] = float(good)
    table = markdown_table(
        ["guide", f"held-out IWAE-{particles} / token [95%]", "affine − gated (paired 95%)",
         "held-out −ELBO / token [95%]", "affine − gated (paired 95%)", "KL / token", "dims > 0.1 explained",
         "SVI steps", "steps per CPU s", "training CPU s"], rows)
    figure = _plot_guides(curves, Path(figure_dir) / "text_guide_scan.png")
    train = schedule.train
    held_out = runs[first][0].tokens
    own = train.steps // GUIDE_STEP_FACTOR
    at = [h["cpu_seconds"] for h in curves.get(first, []) if h["step"] == own]
    cost = f"; the schedule's own {own} steps took the gated guide {at[0]:.0f} CPU s" if at else ""
    setup = (
        f"The `{GUIDE_PRESET}` preset (Gaussian family: guide reading frozen SmolLM2-135M features, "
        f"layer 12, reversed, cached; the same {held_out.size} held-out documents and {int(held_out.sum()):,} "
        f"tokens as above, at most {schedule.max_train_tokens:,} training tokens) with the `{GUIDE_SCHEDULE}` "
        f"schedule (subsequence regime, batch {train.batch_size}, lengths {train.min_length}–{train.max_length}, "
        f"budget {train.budget} states, learning rate {train.learning_rate:g}{cost}), once with each guide. "
        f"Both train for {seconds:.0f} CPU seconds of SVI on one thread: the run stops at the CPU budget "
        "(`TrainConfig.max_cpu_seconds`, process CPU time spent in SVI steps), not at a step count "
        f"(the step limit, {train.steps:,}, lies far beyond it), so the faster guide takes more steps. "
        f"Bounds are nats per token over SmolLM2's full vocabulary, {particles} draws per held-out "
        "document; intervals are 95% percentile bootstraps over held-out documents, the same draws for "
        "both guides, so the differences are paired. One training run (seed 0) per guide: the intervals "
        "cover the held-out documents, not the training randomness."
    )
    md = f"{table}\n\n![training −ELBO against CPU time](figures/{figure.name})\n\n{setup}\n\n{words}"
    config = {"guide_preset": GUIDE_PRESET, "guide_schedule": GUIDE_SCHEDULE, "guide_cpu_seconds": seconds,
              "guides": [g for g, _ in GUIDES], "guide_default": default,
              "guide_stopped": {g: runs[g][0].extra["stopped"] for g, _ in GUIDES}}
    return md, metrics, config, figure


def _plot_guides(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for guide, label in GUIDES:
        hist = curves.get(guide, [])
        ax.plot([h["cpu_seconds"] for h in hist], [-h["elbo_per_token"] for h in hist], label=f"{guide}: {label}")
    ax.set_xlabel("training CPU seconds (one thread)")
    ax.set_ylabel("training −ELBO / token (nats)")
    ax.set_title(f"{GUIDE_PRESET}: gated vs scan guide")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    result = summarise(runs, curves, schedule, figure_dir, quick)
    found = guide_comparison(quick, train_tokens, test_tokens, particles)
    md, metrics, config, figure = guide_summary(*found, figure_dir)
    result.markdown += f"\n\n### The scan guide against the gated guide at equal CPU time (`{GUIDE_PRESET}`)\n\n{md}"
    result.metrics.update(metrics)
    result.config.update(config)
    result.figures.append(figure)
    return result
