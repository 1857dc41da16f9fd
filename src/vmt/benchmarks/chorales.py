"""``vmt bench chorales``: the ``jsb`` preset against the published deep-Markov-model bounds,
and VMT vs a deep-Markov-model baseline on Bach chorales.

**Budgeted runs** (the first part). The ``jsb`` model preset trained with a budgeted schedule
(``jsb-hour`` by default: at most one CPU-hour of SVI on one thread, validation-based
stopping) for three seeds on the standard JSB split, and with the same preset and schedule on
the music21 chorales. Each seed reports its best validation bound against training CPU time
(the curve, with the published 6.87 / 6.93 nats lines), and the best-on-validation model's
test negative ELBO, IWAE-64 and IWAE-1000 per time step. ``$VMT_CHORALES_SCHEDULE`` names
another schedule and ``$VMT_CHORALES_CPU_SECONDS`` overrides its CPU budget per seed (the page
says what was run); each seed's run folder (``runs/bench/chorales/``) keeps its result, so a
second invocation with the same settings reuses finished seeds and resumes an unfinished one
(``$VMT_CHORALES_REUSE_ONLY=1`` renders the finished seeds without training;
``$VMT_CHORALES_COMPARISON=0`` skips the second part).

**Equal-budget comparison** (the second part, as before). Both models have the same generative
architecture (gated transition, MLP Bernoulli emission over the 88 keys) and the same guide
networks reading the piano roll with a GRU in reverse. They differ in what the VMT adds:

* **VMT**: a multimodal prior for the first state of *any* subsequence, the guide told the
  number of steps ahead ``T``, and suffix-parallel SVI on random subsequences with a length
  curriculum;
* **DMM baseline** (after Krishnan et al. / Pyro's DMM example): a single Gaussian for the
  first state, whole sequences per step, KL annealing.

Both are trained in the same run with the same budget of sampled latent states and evaluated
on the test split: negative ELBO and IWAE-k NLL bound per time step (each test piece is one
chain). The standard JSB split is read from ``--data PATH`` (or ``$VMT_JSB_PICKLE``); the
music21 chorales ship with music21.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from pathlib import Path

import torch

from vmt.benchmarks.report import BenchResult, markdown_table

NAME = "chorales"
SUMMARY = ("JSB / music21 chorales: the jsb preset's bound against CPU time (3 seeds, IWAE-1000) "
           "and VMT vs a DMM-style baseline")

PRESET = "jsb"
SCHEDULE = "jsb-hour"
SEEDS = (0, 1, 2)
PUBLISHED = [
    ("Pyro DMM tutorial, no IAF, 5,000 epochs", "test −ELBO", 6.87),
    ("Pyro DMM tutorial, 1 IAF", "test −ELBO", 6.82),
    ("Pyro DMM tutorial, 2 IAFs", "test −ELBO", 6.80),
    ("Krishnan et al. 2017 (DKS guide)", "test bound", 6.93),
    ("Krishnan et al. 2017", "importance-sampled NLL estimate", 6.39),
]
SOURCES = (
    "Pyro's deep Markov model tutorial (pyro.ai/examples/dmm.html: 6.87 / 6.82 / 6.80 nats per "
    "time step with 0 / 1 / 2 inverse autoregressive flows after 5,000 epochs) and Krishnan, "
    "Shalit & Sontag, *Structured Inference Networks for Nonlinear State Space Models*, AAAI "
    "2017 (JSB: bound 6.93, importance-sampled estimate 6.39 nats per time step)"
)


# -- the budgeted runs ------------------------------------------------------------------------
def _configs(quick: bool):
    from vmt import experiment
    from vmt.music_experiment import MusicPreset, MusicSchedule

    preset = MusicPreset.from_dict(experiment.load_json(experiment.resolve_config(PRESET, "models")))
    name = os.environ.get("VMT_CHORALES_SCHEDULE", SCHEDULE)
    schedule = MusicSchedule.from_dict(experiment.load_json(experiment.resolve_config(name, "inference")))
    budget = os.environ.get("VMT_CHORALES_CPU_SECONDS")
    if quick:
        preset = dataclasses.replace(preset, reader_hidden=32,
                                     vmt={**preset.vmt, "state_dim": 8, "transition_hidden": 32,
                                          "guide_hidden": 32, "emission_hidden": 32})
        schedule = dataclasses.replace(
            schedule, max_cpu_seconds=10.0, eval_every=20, test_particles=4, iwae_particles=16,
            train=dataclasses.replace(schedule.train, steps=60, lr_decay_steps=60, annealing_steps=30,
                                      steps_per_length=1, max_length=16, budget=256))
        name += " (quick sizes)"
    elif budget:
        schedule = schedule.with_budget(float(budget))
        name += f", budget overridden to {float(budget):.0f} CPU s per seed"
    return preset, schedule, name


def _run_seed(preset, schedule, splits, label: str, seed: int, root: Path, data_name: str,
              reuse_only: bool = False) -> dict | None:
    """One seed's run (reusing ``result.json`` of a finished run with the same settings; with
    ``reuse_only`` nothing is trained and a seed without a finished run gives None)."""
    from vmt.music_experiment import run_music

    out = root / f"{label}-seed{seed}"
    schedule = schedule.with_seed(seed)
    settings = _settings(preset, schedule)
    done = out / "result.json"
    stamp = out / "settings.json"
    if done.is_file() and stamp.is_file() and _same(stamp, settings):
        return json.loads(done.read_text())
    if reuse_only:
        return _unfinished(out, stamp, settings, preset)
    if callable(splits):
        splits = splits()
    out.mkdir(parents=True, exist_ok=True)
    resume = stamp.is_file() and _same(stamp, settings)
    stamp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    result = run_music(preset, schedule, splits, out, resume=resume, data_name=data_name)
    if result.test is None:
        raise RuntimeError(f"the {label} run of seed {seed} stopped without a test evaluation ({result.stopped})")
    return result.to_dict()


def _settings(preset, schedule) -> dict:
    """What a seed's run folder must have been trained with to be reused (descriptions aside)."""
    data = {"preset": dataclasses.asdict(preset), "schedule": dataclasses.asdict(schedule)}
    for part in data.values():
        part.pop("description", None)
    return json.loads(json.dumps(data))


def _same(stamp: Path, settings: dict) -> bool:
    stored = json.loads(stamp.read_text())
    for part in stored.values():
        if isinstance(part, dict):
            part.pop("description", None)
    return stored == settings


def _unfinished(out: Path, stamp: Path, settings: dict, preset) -> dict | None:
    """What an unfinished run of the same settings measured so far (its validation curve), or None."""
    progress = out / "progress.json"
    if not (progress.is_file() and stamp.is_file() and _same(stamp, settings)):
        return None
    data = json.loads(progress.read_text())
    if not data.get("curve"):
        return None
    best = data["best"]
    return {"steps": data["step"], "cpu_seconds": data["cpu_seconds"], "best_step": best["step"],
            "curve": data["curve"], "stopped": "unfinished", "valid": {"neg_elbo": best["valid_neg_elbo"]},
            "test": None, "iwae": None,
            "parameters": sum(p.numel() for p in preset.build().parameters())}


def _offset(results: list[dict]) -> str:
    done = [r["test"]["neg_elbo"] - r["valid"]["neg_elbo"] for r in results if r["test"] is not None]
    return f"{statistics.mean(done):+.2f}" if done else "(no test yet)"


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _extrapolate(curves: list[list[dict]], horizon: float) -> tuple[float, tuple] | None:
    """Fit ``a + b * t^(-c)`` to the best-so-far validation bound against CPU seconds (every
    seed's points pooled, from the first quarter of the budget on) and evaluate it at
    ``horizon``: an extrapolation, not a measurement."""
    import numpy as np
    from scipy.optimize import curve_fit

    points = []
    for curve in curves:
        best = math.inf
        for rec in curve:
            best = min(best, rec["valid_neg_elbo"])
            points.append((rec["cpu_seconds"], best))
    if len(points) < 6:
        return None
    t_max = max(t for t, _ in points)
    t, y = map(np.array, zip(*[(t, v) for t, v in points if t >= 0.25 * t_max], strict=True))
    if len(t) < 4:
        return None
    try:
        params, _ = curve_fit(lambda s, a, b, c: a + b * s ** (-c), t, y, p0=(y.min() - 0.5, 10.0, 0.5),
                              bounds=([0.0, 0.0, 0.01], [20.0, 1e6, 3.0]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    a, b, c = params
    return float(a + b * horizon ** (-c)), (float(a), float(b), float(c))


def _collect_runs(datasets: dict, quick: bool, root: Path):
    """Every seed's run (trained, resumed or reused): the configs, the runs per data set and the
    seeds that were not run."""
    preset, schedule, schedule_name = _configs(quick)
    runs: dict[str, list[dict]] = {label: [] for label in datasets}
    missing = []
    reuse_only = os.environ.get("VMT_CHORALES_REUSE_ONLY", "") not in ("", "0")
    # every JSB seed first, then music21 (whose parsing is slow the first time)
    order = [(label, s) for label in datasets for s in SEEDS if s == 0 or (label == "JSB" and not quick)]
    for label, s in order:
        found = _run_seed(preset, schedule, datasets[label], label.lower(), s, root, label, reuse_only)
        if found is None:
            missing.append(f"{label} seed {s}")
        else:
            runs[label].append(found | {"seed": s})
    runs = {label: rs for label, rs in runs.items() if rs}
    return preset, schedule, schedule_name, runs, missing


def _budget_table(runs: dict, schedule) -> tuple[list[list], dict[str, float]]:
    """One row per seed (and mean ± sd per data set), and the metrics."""
    k = schedule.iwae_particles
    dash = "–"
    rows, metrics = [], {}
    for label, results in runs.items():
        for r in results:
            test = r["test"] or {}
            rows.append([label, r["seed"], r["steps"], round(r["cpu_seconds"]), r["stopped"], r["best_step"],
                         r["valid"]["neg_elbo"], test.get("neg_elbo", dash), test.get("iwae", dash),
                         r["iwae"]["iwae"] if r.get("iwae") else dash])
        done = [r for r in results if r["test"] is not None]
        if len(done) > 1:
            rows.append([f"{label}, mean ± sd of {len(done)} seeds", "", "",
                         _spread([r["cpu_seconds"] for r in done]), "", "",
                         _spread([r["valid"]["neg_elbo"] for r in done]),
                         _spread([r["test"]["neg_elbo"] for r in done]),
                         _spread([r["test"]["iwae"] for r in done]),
                         _spread([r["iwae"]["iwae"] for r in done]) if k else dash])
        key = label.lower()
        if done:
            metrics[f"{key}_test_neg_elbo_mean"] = statistics.mean(r["test"]["neg_elbo"] for r in done)
            metrics[f"{key}_test_iwae{schedule.test_particles}_mean"] = statistics.mean(
                r["test"]["iwae"] for r in done)
            if k:
                metrics[f"{key}_test_iwae{k}_mean"] = statistics.mean(r["iwae"]["iwae"] for r in done)
            metrics[f"{key}_train_cpu_seconds_mean"] = statistics.mean(r["cpu_seconds"] for r in done)
        for r in done:
            metrics[f"{key}_seed{r['seed']}_test_neg_elbo"] = r["test"]["neg_elbo"]
            if k:
                metrics[f"{key}_seed{r['seed']}_test_iwae{k}"] = r["iwae"]["iwae"]

    return rows, metrics


def _budget_figure(runs: dict, quick: bool, figure_dir: Path) -> tuple[Path, tuple | None]:
    """The best validation bound against CPU time per seed, with the published lines and the
    power-law extrapolation; also the extrapolation's ``(value, a, b, c, span)`` if made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    extrapolated = None
    for ax, (label, results) in zip(axes[0], runs.items(), strict=True):
        for r in results:
            t = [rec["cpu_seconds"] / 60 for rec in r["curve"]]
            v = [rec["valid_neg_elbo"] for rec in r["curve"]]
            best = [min(v[: i + 1]) for i in range(len(v))]
            (line,) = ax.plot(t, best, label=f"seed {r['seed']}: best validation −ELBO")
            ax.plot(t, v, color=line.get_color(), alpha=0.3, lw=0.8)
            if r["test"] is not None:
                ax.plot([r["cpu_seconds"] / 60], [r["test"]["neg_elbo"]], "o", color=line.get_color())
        if label == "JSB":
            ax.axhline(6.87, color="k", ls="--", lw=1, label="6.87: Pyro DMM tutorial (no IAF)")
            ax.axhline(6.93, color="grey", ls=":", lw=1, label="6.93: Krishnan et al. 2017")
            growing = [r["curve"] for r in results if r["stopped"] != "patience"]
            fit = _extrapolate(growing, 3600.0) if growing else None
            if fit is not None and not quick:
                value, (a, b, c) = fit
                span = max(rec["cpu_seconds"] for r in results for rec in r["curve"])
                grid = [span * (1 + i / 50 * (3600 / span - 1)) for i in range(51)]
                if span < 3600:
                    ax.plot([g / 60 for g in grid], [a + b * g ** (-c) for g in grid], color="tab:red",
                            ls="-.", lw=1, label="extrapolation (power-law fit)")
                extrapolated = (value, a, b, c, span)
        ax.set_title(f"{label}: best bound against training CPU time")
        ax.set_xlabel("training CPU minutes (one thread)")
        ax.set_ylabel("−ELBO per time step (nats)")
        lows = [min(rec["valid_neg_elbo"] for rec in r["curve"]) for r in results]
        ax.set_ylim(min(6.7, min(lows) - 0.1), max(lows) + 1.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure = Path(figure_dir) / "chorales_budget.png"
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    return figure, extrapolated


def _budget_notes(preset, schedule, schedule_name: str, runs: dict, rows: list[list], missing: list[str],
                  extrapolated: tuple | None) -> str:
    """The table, the figure, the published numbers and what was run."""
    k = schedule.iwae_particles
    table = markdown_table(
        ["data", "seed", "SVI steps", "training CPU s", "stopped by", "best step", "valid −ELBO",
         "test −ELBO", f"test IWAE-{schedule.test_particles}", f"test IWAE-{k}" if k else "test IWAE"], rows)
    published = markdown_table(["published (JSB)", "quantity", "nats / step"], [list(p) for p in PUBLISHED])
    sizes = ", ".join(f"{key} {value}" for key, value in sorted(preset.vmt.items()))
    train = schedule.train
    notes = [
        f"Model preset `{PRESET}` ({sizes}; reverse GRU reader {preset.reader_hidden}; "
        f"{runs[next(iter(runs))][0]['parameters']:,} parameters) with schedule `{schedule_name}` "
        f"(at most {schedule.max_cpu_seconds:.0f} CPU s of SVI per seed on one thread, "
        f"{train.steps:,} steps at most; validation −ELBO ({schedule.valid_particles} draws per piece) "
        f"every {schedule.eval_every} steps, the best model scored on test; batch {train.batch_size}, "
        f"suffix-parallel budget {train.budget} states, subsequences up to {train.max_length} steps; "
        f"{'AdamW with weight decay ' + format(train.weight_decay, 'g') + ', ' if train.weight_decay else ''}"
        f"learning rate {train.learning_rate:g} with a cosine decay to "
        f"{train.lr_final_fraction:g}× over {train.lr_decay_steps:,} steps; KL annealing from "
        f"{train.annealing_start:g} over {train.annealing_steps:,} steps"
        f"{f'; {schedule.patience} validations without improvement stop a run' if schedule.patience else ''}).",
        "Every number is nats per time step on whole pieces (each piece one chain); −ELBO is the "
        f"mean over the same {schedule.test_particles} draws whose log-mean-exp gives IWAE-"
        f"{schedule.test_particles}; IWAE-{k} uses fresh draws. All are upper bounds on the NLL, "
        "IWAE the tighter. Training CPU time is process time of the SVI steps (validation and "
        "test evaluation not included; their CPU time is in the JSON).",
        f"Published numbers, quoted from {SOURCES}. Pyro's numbers are the negative ELBO of its "
        "model with state 100, RNN 600, after 5,000 epochs (several CPU-hours).",
    ]
    if extrapolated is not None:
        value, a, b, c, span = extrapolated
        notes.append(
            f"**Extrapolation, not a measurement:** a power law `a + b·t^(−c)` fitted to the best "
            f"validation bound of the {len(runs['JSB'])} seed(s) not stopped by patience against CPU seconds (a = {a:.3f}, b = {b:.3g}, "
            f"c = {c:.3f}; points after a quarter of the {span:.0f} s measured) gives {value:.3f} "
            "nats per step at 3,600 CPU s (validation split; the test split runs about "
            f"{_offset(runs.get('JSB', []))} from it here). The fitted runs decay their learning rate "
            "within their own budget, so this is a rough guide to the hour, not its curve."
            if "JSB" in runs else "")
    notes.extend(_limits(runs, k))
    unfinished = [f"{label} seed {r['seed']}" for label, rs in runs.items() for r in rs if r["test"] is None]
    if unfinished:
        notes.append(f"Unfinished (stopped part-way; the curve so far is drawn, the valid column is the "
                     f"best validation bound so far, no test evaluation): {', '.join(unfinished)}.")
    if missing:
        notes.append(f"Not run (the compute available ran out; `$VMT_CHORALES_REUSE_ONLY` rendered the "
                     f"finished seeds): {', '.join(missing)}.")
    md = "\n\n".join([table, "![bound against CPU time](figures/chorales_budget.png)", published, *notes])
    return md


def _limits(runs: dict, k: int) -> list[str]:
    """What the finished runs say limits the bound: where the best step fell against the CPU
    spent, how far the training bound had fallen below the validation bound there (fitting the
    training pieces rather than the music), and what the guide leaves (−ELBO minus IWAE-k)."""
    notes = []
    for label, results in runs.items():
        done = [r for r in results if r["test"] is not None]
        if not done:
            continue
        at_best = [next(c for c in r["curve"] if c["step"] == r["best_step"]) for r in done]
        best_cpu = statistics.mean(c["cpu_seconds"] for c in at_best)
        spent = statistics.mean(r["cpu_seconds"] for r in done)
        gaps = [r["curve"][-1]["valid_neg_elbo"] - r["curve"][-1]["train_neg_elbo"] for r in done]
        gaps = [g for g in gaps if math.isfinite(g)]
        patience = sum(r["stopped"] == "patience" for r in done)
        text = (f"**What limits the bound ({label}, mean of {len(done)} seed(s)).** The best validation bound "
                f"came at {best_cpu:.0f} of the {spent:.0f} CPU s spent; {patience} of {len(done)} run(s) "
                "stopped because the validation bound no longer improved.")
        if gaps:
            text += (f" At the last validation the validation −ELBO stood {statistics.mean(gaps):+.2f} nats "
                     "above the training −ELBO of that step's subsequences (one batch, so noisy): the model "
                     "fits the training pieces better than music it has not heard.")
        if k:
            guide_gap = statistics.mean(r["test"]["neg_elbo"] - r["iwae"]["iwae"] for r in done)
            text += (f" The guide leaves {guide_gap:.2f} nats per step between the test −ELBO and IWAE-{k}: "
                     "a posterior closer to the model's would tighten the −ELBO by up to that much.")
        notes.append(text)
    return notes


def budgeted(datasets: dict, quick: bool, figure_dir: Path, root: Path):
    """The budgeted runs: rows, metrics, figure and notes."""
    preset, schedule, schedule_name, runs, missing = _collect_runs(datasets, quick, root)
    rows, metrics = _budget_table(runs, schedule)
    figure, extrapolated = _budget_figure(runs, quick, figure_dir)
    if extrapolated is not None:
        metrics["jsb_extrapolated_valid_neg_elbo_3600s"] = extrapolated[0]

    md = _budget_notes(preset, schedule, schedule_name, runs, rows, missing, extrapolated)
    return md, metrics, figure, {"schedule": schedule_name, "preset": PRESET,
                                 "max_cpu_seconds": schedule.max_cpu_seconds,
                                 "seeds": {label: [r["seed"] for r in rs] for label, rs in runs.items()}}


# -- the guide families at equal CPU time (JSB) ---------------------------------------------------
GUIDES = (("gaussian", "gated combiner, diagonal Gaussian step (the preset)"),
          ("affine", "affine in the state, path sampled by a parallel scan"))
GUIDE_SECONDS = 600.0


def _guide_setup(quick: bool):
    """The preset and the schedule both guides train with: ``jsb-hour`` compressed to
    ``$VMT_CHORALES_GUIDE_SECONDS`` (600) CPU seconds, no early stop, no IWAE-1000, and a step
    limit far beyond what the budget allows, so that the CPU budget ends both runs (a faster
    guide takes more steps; the learning rate stays at its floor after the decay)."""
    preset, schedule, _ = _configs(quick)
    seconds = schedule.max_cpu_seconds
    if not quick:
        seconds = float(os.environ.get("VMT_CHORALES_GUIDE_SECONDS", GUIDE_SECONDS))
        schedule = schedule.with_budget(seconds)
    train = dataclasses.replace(schedule.train, steps=10 * schedule.train.steps)
    return preset, dataclasses.replace(schedule, patience=0, iwae_particles=0, train=train), seconds


def _piece_row(label: str, result: dict, key: str):
    """A per-piece record of one run's test bound (``key``: ``neg_elbo`` or ``iwae``)."""
    import numpy as np

    from vmt.benchmarks.text_lm import Row

    pieces = np.array(result["test"]["per_piece"], dtype=np.float64)  # (pieces, [steps, -elbo, -iwae])
    column = 1 if key == "neg_elbo" else 2
    return Row(label, key, pieces[:, column], pieces[:, 0])


def guide_comparison(splits, quick: bool, root: Path) -> tuple[str, dict, dict] | None:
    """Train the preset with each guide of :data:`GUIDES` for the same CPU seconds (seed 0) and
    bound the test split; ``None`` if a run is missing (``$VMT_CHORALES_REUSE_ONLY``)."""
    from vmt.benchmarks.text_lm import bootstrap_indices, difference_interval, ratio_interval

    preset, schedule, seconds = _guide_setup(quick)
    reuse_only = os.environ.get("VMT_CHORALES_REUSE_ONLY", "") not in ("", "0")
    results = {}
    for guide, _ in GUIDES:
        found = _run_seed(dataclasses.replace(preset, vmt={**preset.vmt, "guide": guide}), schedule, splits,
                          f"jsb-guide-{guide}", 0, root, "JSB", reuse_only)
        if found is None or found.get("test") is None or "per_piece" not in found["test"]:
            return None
        results[guide] = found
    k = schedule.test_particles
    rows, metrics = [], {}
    first = {key: _piece_row(GUIDES[0][0], results[GUIDES[0][0]], key) for key in ("neg_elbo", "iwae")}
    draws = bootstrap_indices(len(first["neg_elbo"].tokens))
    for guide, label in GUIDES:
        r = results[guide]
        cells = []
        for key in ("neg_elbo", "iwae"):
            row = _piece_row(guide, r, key)
            lo, hi = ratio_interval(row.nll, row.tokens, draws)
            d, a, b = difference_interval(row, first[key], draws)
            cells += [f"{row.per_token:.3f} [{lo:.3f}, {hi:.3f}]",
                      "–" if guide == GUIDES[0][0] else f"{d:+.3f} [{a:+.3f}, {b:+.3f}]"]
            metrics[f"jsb_guide_{guide}_test_{key if key == 'neg_elbo' else f'iwae{k}'}"] = row.per_token
        rows.append([f"`{guide}`: {label}", r["steps"], round(r["cpu_seconds"]),
                     round(r["steps"] / max(r["cpu_seconds"], 1e-9), 1), r["valid"]["neg_elbo"], *cells])
    table = markdown_table(["guide", "SVI steps", "training CPU s", "steps per CPU s", "valid −ELBO",
                            "test −ELBO [95%]", "minus gated (paired 95%)", f"test IWAE-{k} [95%]",
                            "minus gated (paired 95%)"], rows)
    note = (f"Both guides train the `{PRESET}` preset (seed 0) with the `{SCHEDULE}` schedule compressed to "
            f"{seconds:.0f} CPU seconds of SVI on one thread (the learning-rate decay scaled to it, then flat; no "
            "early stop; the CPU budget ends both runs, so the faster guide takes more steps); the model with the best validation bound is scored on the test pieces, one piece at a "
            f"time, {k} draws. Intervals are 95% percentile bootstraps over the test pieces; the differences "
            "are paired (the same resampled pieces for both guides). One training run per guide: the "
            "intervals cover the test pieces, not the training randomness.")
    return f"{table}\n\n{note}", metrics, {"guide_cpu_seconds": seconds, "guides": [g for g, _ in GUIDES]}


def _guide_section(datasets: dict, quick: bool, root: Path) -> tuple[str, dict, dict]:
    """The page's guide-family section (JSB only; ``$VMT_CHORALES_GUIDES=0`` skips it)."""
    if "JSB" not in datasets or os.environ.get("VMT_CHORALES_GUIDES", "1") == "0":
        return "", {}, {"guides": False}
    found = guide_comparison(datasets["JSB"], quick, root)
    title = "\n\n### Guide families at equal CPU time (JSB)\n\n"
    if found is None:
        return f"{title}Not run (`$VMT_CHORALES_REUSE_ONLY` and no finished runs).", {}, {"guides": False}
    md, metrics, config = found
    return title + md, metrics, config


# -- the equal-budget comparison ---------------------------------------------------------------
def _models(obs_dim: int, quick: bool):
    from vmt.models import VariationalMarkovTransformer, VMTConfig

    hidden = 64 if quick else 128
    common = dict(state_dim=32, obs_dim=obs_dim, feature_dim=hidden, emission="bernoulli",
                  emission_hidden=64, transition="gated", transition_hidden=hidden,
                  guide_hidden=hidden, max_window=256)
    spec = {"kind": "gru", "kwargs": {"input": "features", "hidden_size": hidden, "feature_dim": obs_dim}}
    vmt = VariationalMarkovTransformer(VMTConfig(prior="mixture", prior_components=8, **common), reader_spec=spec)
    dmm = VariationalMarkovTransformer(VMTConfig(prior="mixture", prior_components=1, **common), reader_spec=spec)
    return vmt, dmm


def compare(datasets: dict, steps: int, particles: int, quick: bool, seed: int = 0):
    """Train both models on each dataset with equal state budgets; returns rows and curves."""
    from vmt.inference.evaluate import evaluate
    from vmt.inference.train import TrainConfig, fit

    rows, curves, metrics = [], {}, {}
    for label, data in datasets.items():
        train, test = data["train"], data["test"]
        mean_len = sum(len(s) for s in train) / len(train)
        longest = max(len(s) for s in train + test)
        batch = 8
        budget = 1024
        # DMM: whole pieces, batch of 8 -> about batch * mean_len states per step; match totals.
        dmm_steps = max(1, round(steps * budget / (batch * mean_len)))
        torch.manual_seed(seed)
        vmt, dmm = _models(train[0].shape[-1], quick)
        configs = {
            "VMT": (vmt, TrainConfig(regime="subsequence", steps=steps, batch_size=batch, budget=budget,
                                     min_length=2, max_length=64, steps_per_length=max(1, steps // 126),
                                     learning_rate=3e-3, aux_weight=0.05, max_skip=0, seed=seed,
                                     annealing_start=0.2, annealing_steps=steps // 2, log_every=max(1, steps // 40))),
            "DMM": (dmm, TrainConfig(regime="subsequence", steps=dmm_steps, batch_size=batch,
                                     suffix_parallel=False, min_length=longest, max_length=longest,
                                     learning_rate=3e-3, aux_weight=0.0, max_skip=0, seed=seed,
                                     annealing_start=0.2, annealing_steps=dmm_steps // 2,
                                     log_every=max(1, dmm_steps // 40))),
        }
        for method, (model, cfg) in configs.items():
            result = fit(model, train, cfg, progress=False)
            ev = evaluate(model, test, window=longest, particles=particles, streams=8)
            key = f"{'jsb' if 'JSB' in label else 'music21'}_{method.lower()}"
            metrics[f"{key}_neg_elbo_per_step"] = ev.neg_elbo_per_token
            metrics[f"{key}_iwae{particles}_per_step"] = ev.iwae_per_token
            states = [h["step"] * (budget if method == "VMT" else batch * mean_len) for h in result.history]
            curves[(label, method)] = (states, [-h["elbo_per_token"] for h in result.history])
            rows.append([label, method, cfg.steps, ev.neg_elbo_per_token, ev.iwae_per_token, ev.tokens])
    return rows, curves, metrics


def _comparison(datasets: dict, quick: bool, figure_dir: Path):
    steps = 60 if quick else 600
    particles = 4 if quick else 16
    rows, curves, metrics = compare(datasets, steps, particles, quick)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.5), squeeze=False)
    for ax, label in zip(axes[0], datasets, strict=True):
        for method in ("VMT", "DMM"):
            x, y = curves[(label, method)]
            ax.plot(x, y, label=method)
        ax.set_title(label)
        ax.set_xlabel("latent states sampled")
        ax.set_ylabel("training −ELBO per step (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    figure = Path(figure_dir) / "chorales_training.png"
    fig.savefig(figure, dpi=110)
    plt.close(fig)

    table = markdown_table(
        ["data", "model", "SVI steps", "test −ELBO / step", f"test IWAE-{particles} / step", "test steps"], rows
    )
    note = (
        "Both models share the generative architecture and guide networks and sample the same "
        "number of latent states during training; each test piece is one chain and both "
        "columns are upper bounds on the NLL per time step (nats), IWAE the tighter. "
        "Sizes are CPU-scale (state 32, hidden 128) and the budget is 600 VMT steps, so the "
        "absolute numbers are far above the budgeted runs above; the comparison is within this table."
    )
    md = f"{table}\n\n![training curves](figures/{figure.name})\n\n{note}"
    return md, metrics, figure, {"steps_vmt": steps, "particles": particles}


def run(quick: bool, figure_dir: Path, data: str | None = None) -> BenchResult:
    from vmt.data.music import load_jsb_chorales, music21_chorales

    loaded: dict = {}

    def music21_splits():  # parsed only when a run needs it
        if "music21" not in loaded:
            loaded["music21"] = music21_chorales(max_pieces=60 if quick else None)
        return loaded["music21"]

    datasets: dict = {}
    path = data or os.environ.get("VMT_JSB_PICKLE")
    if path:
        datasets["JSB"] = load_jsb_chorales(path)
    datasets["music21"] = music21_splits
    root = Path("runs") / "bench" / ("chorales-quick" if quick else "chorales")
    budget_md, budget_metrics, budget_figure, budget_config = budgeted(datasets, quick, figure_dir, root)
    labels = {"JSB": "JSB (standard split)", "music21": "music21 chorales"}
    md = f"### The `{PRESET}` preset against the published bounds\n\n{budget_md}"
    figures = [budget_figure]
    guide_md, guide_metrics, guide_config = _guide_section(datasets, quick, root)
    md += guide_md
    compare_metrics, compare_config = {}, {"comparison": False}
    if os.environ.get("VMT_CHORALES_COMPARISON", "1") != "0":
        datasets["music21"] = music21_splits()
        compare_md, compare_metrics, compare_figure, compare_config = _comparison(
            {labels[k]: v for k, v in datasets.items()}, quick, figure_dir)
        md += f"\n\n### VMT vs a DMM-style baseline at equal budget\n\n{compare_md}"
        figures.append(compare_figure)
    if not path:
        md += "\n\nThe JSB rows are absent: pass the standard split with `--data PATH`."
    metrics = {**budget_metrics, **guide_metrics, **compare_metrics}
    config = {**budget_config, **guide_config, **compare_config, "datasets": list(datasets)}
    if "music21" in loaded:
        config["music21_pieces"] = sum(len(v) for v in loaded["music21"].values())
    assert all(math.isfinite(v) for v in metrics.values())
    return BenchResult(NAME, metrics, config, md, figures)
