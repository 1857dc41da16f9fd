"""``vmt bench text-ablation``: what each change of the text VMT does, on the demo's split.

Every row is one configuration fitted with :func:`vmt.experiment.run_text` on the same split
as ``make demo`` (the leading 24,000 training tokens of ``pydoc_data.topics``) and scored on
the whole held-out split; the n-gram rows are fitted on the same 24,000 tokens. Each row
changes one thing from the row it names (``base``), so the table reads as an ablation:

* the first text VMT (``text-smollm2`` with its ``demo`` schedule: gated Gaussian transition,
  categorical emission), which collapses;
* the token family (:mod:`vmt.models.tokens`) without and with distillation from SmolLM2;
* its slot noise, memory-noise floor, memory guide and fixed token basis;
* the training schedule (length, cosine learning-rate decay).

Reported per row: held-out IWAE-k per token over SmolLM2's full vocabulary with a 95%
bootstrap interval over documents, the paired difference to the Kneser-Ney bigram, KL and
reconstruction per token, the number of state dimensions whose spread depends on the text,
and the training CPU time.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vmt.benchmarks.report import BenchResult, markdown_table

NAME = "text-ablation"
SUMMARY = "demo split: the text VMT's changes one at a time, with intervals and diagnostics"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row: a preset and schedule with overrides.

    Attributes:
        key: metric name of the row.
        label: what the row changes (from ``base``).
        base: key of the row it is compared with (``""``: none).
        preset / schedule: shipped names (or JSON paths).
        vmt: overrides of the preset's ``vmt`` entry.
        train: overrides of the schedule's training settings.
    """

    key: str
    label: str
    base: str = ""
    preset: str = "text-token"
    schedule: str = "token-demo"
    vmt: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("gated", "first text VMT: gated Gaussian transition, categorical emission (`text-smollm2` + `demo`)",
            preset="text-smollm2", schedule="demo"),
    Variant("token", "token family, no distillation", "gated", train={"distill_weight": 0.0}),
    Variant("token_distill", "+ distillation from SmolLM2 (weight 8): the `text-token` + `token-demo` pair", "token"),
    Variant("slot_noise_small", "slot noise 0.1 instead of 0.5", "token_distill", vmt={"slot_scale": 0.1}),
    Variant("memory_floor_small", "memory-noise floor 0.001 instead of 0.1", "token_distill",
            vmt={"min_scale": 0.001}),
    Variant("memory_guide_features", "memory guide shifted by the features at every step", "token_distill",
            vmt={"memory_guide": "features"}),
    Variant("token_basis", "SmolLM2 input embeddings as a fixed token basis (128 components)", "token_distill",
            vmt={"token_basis_dim": 128}),
    Variant("constant_lr", "constant learning rate (no cosine decay)", "token_distill", train={"lr_decay_steps": 0}),
)


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the demo split's training cap, held-out cap, and step overrides."""

    train_tokens: int = 24_000
    test_tokens: int = 1_000_000
    steps: int | None = None
    particles: int | None = None
    variants: tuple[str, ...] = ()


FULL = Settings()
QUICK = Settings(train_tokens=3000, test_tokens=800, steps=20, particles=2,
                 variants=("gated", "token", "token_distill"))


def _schedule(variant: Variant, settings: Settings):
    from vmt import experiment

    schedule = experiment.Schedule.from_dict(
        experiment.load_json(experiment.resolve_config(variant.schedule, "inference")))
    train = replace(schedule.train, **variant.train)
    if settings.steps is not None:
        train = replace(train, steps=settings.steps, checkpoint_every=settings.steps,
                        annealing_steps=min(train.annealing_steps, settings.steps // 2),
                        steps_per_length=min(train.steps_per_length, max(1, settings.steps // 20)),
                        log_every=min(train.log_every, settings.steps),
                        lr_decay_steps=settings.steps if train.lr_decay_steps else 0)
    changes = {"train": train, "max_train_tokens": settings.train_tokens,
               "max_test_tokens": settings.test_tokens, "reverse_steps": 0}
    if settings.particles is not None:
        changes["eval_particles"] = settings.particles
    return replace(schedule, **changes)


def fit_variant(variant: Variant, settings: Settings):
    """``(Row, run)``: the variant's per-document held-out IWAE NLL and its diagnostics."""
    import pyro

    from vmt import experiment
    from vmt.benchmarks.text_lm import Row

    data = experiment.load_json(experiment.resolve_config(variant.preset, "models"))
    data = {k: v for k, v in data.items() if k != "description"}
    preset = experiment.ModelPreset.from_dict({**data, "vmt": {**data["vmt"], **variant.vmt}})
    schedule = _schedule(variant, settings)
    logger.info("text-ablation: %s (%d steps)", variant.key, schedule.train.steps)
    pyro.set_rng_seed(schedule.train.seed)
    with tempfile.TemporaryDirectory() as out:
        result = experiment.run_text(preset, schedule, out, resume=False, progress=False)
    test = result.test
    docs = sorted(test.per_document, key=lambda d: d.index)
    history = result.train.history
    extra = {"iwae": test.iwae_per_token, "neg_elbo": test.neg_elbo_per_token, "kl": test.kl_per_token,
             "reconstruction": test.reconstruction_per_token, "oov": test.oov_per_token,
             "explained_dims": test.explained_dims, "state_dim": result.model.config.state_dim,
             "cpu_seconds": history[-1]["cpu_seconds"] if history else 0.0, "steps": result.train.steps,
             "train_elbo_last": history[-1]["elbo_per_token"] if history else float("nan")}
    row = Row(variant.label, variant.key, np.array([d.neg_iwae for d in docs]),
              np.array([d.tokens for d in docs], dtype=np.float64), "", extra)
    return row, result.text_run


def measure(settings: Settings):
    """Every variant of ``settings`` (all of :data:`VARIANTS` when empty) and the n-gram rows
    fitted on the same training tokens: ``(variant rows, n-gram rows, split info)``."""
    from vmt.benchmarks.text_lm import ngram_rows

    chosen = [v for v in VARIANTS if not settings.variants or v.key in settings.variants]
    rows, split = [], None
    for variant in chosen:
        row, run = fit_variant(variant, settings)
        if split is None:
            split = run
        elif run.test_corpus.fingerprint != split.test_corpus.fingerprint:
            raise RuntimeError(f"variant {variant.key} was scored on another held-out split")
        rows.append(row)
    train_docs = list(split.train_corpus.documents)
    test_docs = [d for d in split.test_corpus.documents if len(d)]
    ngrams = ngram_rows(train_docs, test_docs, split.train_corpus.vocab_size)
    info = {"train_tokens": split.train_corpus.num_tokens, "test_tokens": split.test_corpus.num_tokens,
            "test_documents": len(test_docs)}
    return rows, ngrams, info


def summarise(rows, ngrams, info, settings: Settings, quick: bool, figure_dir: Path) -> BenchResult:
    from vmt.benchmarks.text_lm import bootstrap_indices, difference_interval, ratio_interval

    draws = bootstrap_indices(len(rows[0].tokens))
    by_key = {r.key: r for r in rows + ngrams}
    bigram = by_key["kn2"]
    metrics: dict[str, float] = {}
    table = []
    for r in ngrams:
        lo, hi = ratio_interval(r.nll, r.tokens, draws)
        metrics[f"nats_per_token_{r.key}"] = r.per_token
        table.append([r.label, "–", r.per_token, f"[{lo:.3f}, {hi:.3f}]", "–", "–", "–", "–", "–"])
    variants = {v.key: v for v in VARIANTS}
    for r in rows:
        lo, hi = ratio_interval(r.nll, r.tokens, draws)
        d, dlo, dhi = difference_interval(r, bigram, draws)
        metrics[f"iwae_per_token_{r.key}"] = r.per_token
        metrics[f"iwae_per_token_{r.key}_ci_low"], metrics[f"iwae_per_token_{r.key}_ci_high"] = lo, hi
        metrics[f"{r.key}_minus_bigram"] = d
        for name in ("kl", "reconstruction", "explained_dims", "cpu_seconds"):
            if r.extra[name] is not None:
                metrics[f"{r.key}_{name}"] = r.extra[name]
        base = variants[r.key].base
        vs_base = "–"
        if base in by_key:
            bd, blo, bhi = difference_interval(r, by_key[base], draws)
            metrics[f"{r.key}_minus_{base}"] = bd
            vs_base = f"{bd:+.3f} [{blo:+.3f}, {bhi:+.3f}] vs `{base}`"
        dims = "–" if r.extra["explained_dims"] is None else f"{r.extra['explained_dims']} of {r.extra['state_dim']}"
        table.append([f"`{r.key}`: {r.label}", r.extra["steps"], r.per_token, f"[{lo:.3f}, {hi:.3f}]",
                      f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]", vs_base, r.extra["kl"], dims, r.extra["cpu_seconds"]])
    particles = settings.particles or 8
    md = "\n\n".join([
        markdown_table(["row", "steps", f"held-out nats / token (VMT: IWAE-{particles})", "95% interval",
                        "minus the KN bigram (paired 95%)", "minus its base (paired 95%)", "KL / token",
                        "dims > 0.1 explained", "training CPU s"], table),
        f"The `make demo` split: {info['train_tokens']:,} training tokens of `pydoc_data.topics` (the "
        f"n-gram rows are fitted on the same tokens) and the whole held-out split, {info['test_tokens']:,} "
        f"tokens in {info['test_documents']} documents. Nats per token over SmolLM2's full 49,152-token "
        "vocabulary; intervals are 95% percentile bootstraps over held-out documents, the same draws "
        "for every row (paired differences). Each row changes one thing from its base row; rows with "
        "the `token-demo` schedule train for its 2,000 steps (truncated BPTT over whole documents, "
        "batch 8, window 64, distillation weight 8 unless the row says otherwise). One seed per row: "
        "the interval covers the held-out documents, not the training randomness.",
    ])
    config = {"quick": quick, **info, "steps": settings.steps, "variants": [r.key for r in rows]}
    return BenchResult(NAME, metrics, config, md, [])


def run(quick: bool, figure_dir: Path) -> BenchResult:
    settings = QUICK if quick else FULL
    rows, ngrams, info = measure(settings)
    return summarise(rows, ngrams, info, settings, quick, figure_dir)
