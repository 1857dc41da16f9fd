"""``vmt bench text-lm``: the text VMT against reference language models on one split.

One split of the text corpus (the experiment's pipeline: ``pydoc_data.topics``, or the user's
files with ``--text``, tokenised with SmolLM2's tokenizer and split by document), every row
in held-out nats per token over SmolLM2's full 49,152-token vocabulary, with a 95% bootstrap
interval over held-out documents (documents resampled with replacement, the ratio of summed
NLL to summed tokens; the same draws for every row, so differences are paired):

* unigram with add-½ smoothing, interpolated Kneser-Ney bigram and trigram
  (:mod:`vmt.data.ngram`), fitted on the whole training split;
* a GRU language model (:mod:`vmt.nn.gru_lm`) with as many trainable parameters as the best
  VMT's generative part (prior, transition, emission) trained for as much process CPU time as
  that VMT's SVI (feature caching excluded), on the whole training split, over a compact
  vocabulary of the training split with the same out-of-vocabulary price as the VMT's
  emission (``log`` of the number of merged ids);
* SmolLM2-135M reading a ``W``-token sliding window (recomputed every ``W / 2`` tokens, so a
  token sees between ``W / 2`` and ``W - 1`` earlier tokens) and reading the whole document;
  each document starts after SmolLM2's ``<|endoftext|>``;
* each VMT preset + schedule of :data:`VMT_PRESETS`, fitted with
  :func:`vmt.experiment.run_text` on the schedule's own training budget and evaluated on the
  same held-out documents: its IWAE-k bound with the diagnostics of
  :func:`vmt.inference.evaluate.evaluate` (reconstruction / KL split, explained variance,
  active units, mutual information).

Every model scores every token of a held-out document, the first included.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vmt.benchmarks.report import BenchResult, markdown_table

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

NAME = "text-lm"
SUMMARY = "held-out nats/token on one text split: n-grams, same-budget GRU, SmolLM2 and VMT presets"

logger = logging.getLogger(__name__)

#: The VMT rows: ``(model preset, schedule)`` pairs fitted and scored by :func:`vmt_rows`.
VMT_PRESETS: list[tuple[str, str]] = [("text-token", "token-hour")]

BOOTSTRAP_DRAWS = 2000

#: The GRU rows: ``(key, label, dropout, validation selection, distillation weight)``.
GRU_VARIANTS = (
    ("gru", "GRU LM, same parameters and CPU time as the best VMT", 0.0, False, 0.0),
    ("gru_dropout", "same GRU, dropout 0.3, best validation checkpoint", 0.3, True, 0.0),
    ("gru_distilled", "same GRU, dropout 0.3, best validation checkpoint, distilled like the VMT",
     0.3, True, None),
)


@dataclass(frozen=True)
class Settings:
    """Sizes of one run.

    Attributes:
        train_tokens / test_tokens: caps on the training and held-out splits (the leading
            documents of each split; ``None``: all of it).
        window: ``W`` of the SmolLM2 sliding-window row.
        vmt_steps: override of the VMT schedules' SVI steps (``None``: the schedule's).
        vmt_train_tokens: override of the VMT schedules' training tokens (``None``: theirs).
        vmt_particles: override of the schedules' ``k`` (``None``: theirs).
        vocab_max_size: compact vocabulary of the GRU (most frequent training ids).
        split_seed, valid_fraction, test_fraction: the document split (as in a schedule).
    """

    train_tokens: int | None = None
    test_tokens: int | None = None
    window: int = 128
    vmt_steps: int | None = None
    vmt_train_tokens: int | None = None
    vmt_particles: int | None = None
    vocab_max_size: int = 4096
    split_seed: int = 0
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    presets: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(VMT_PRESETS))
    gru_variants: tuple[tuple, ...] = GRU_VARIANTS


FULL = Settings()
QUICK = Settings(train_tokens=20_000, test_tokens=1_500, vmt_steps=40, vmt_train_tokens=4_000,
                 vmt_particles=4)


@dataclass
class Row:
    """One model's held-out NLL per document (nats summed over its tokens)."""

    label: str
    key: str
    nll: np.ndarray
    tokens: np.ndarray
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def per_token(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())


def bootstrap_indices(documents: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """``(draws, documents)`` document indices resampled with replacement."""
    return np.random.default_rng(seed).integers(0, documents, size=(draws, documents))


def ratio_interval(nll: np.ndarray, tokens: np.ndarray, draws: np.ndarray,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``sum nll / sum tokens`` over resampled documents."""
    ratios = nll[draws].sum(1) / tokens[draws].sum(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return float(lo), float(hi)


def difference_interval(a: Row, b: Row, draws: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``a - b`` in nats/token and its paired percentile interval over resampled documents."""
    diff = a.nll[draws].sum(1) / a.tokens[draws].sum(1) - b.nll[draws].sum(1) / b.tokens[draws].sum(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diff, [alpha, 1 - alpha])
    return a.per_token - b.per_token, float(lo), float(hi)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# -- rows -------------------------------------------------------------------------------------
def ngram_rows(train_docs, test_docs, vocab_size: int) -> list[Row]:
    """Unigram add-½ and interpolated Kneser-Ney bigram and trigram over ``vocab_size`` ids."""
    from vmt.data.ngram import AddHalfUnigram, KneserNey

    tokens = np.array([len(d) for d in test_docs], dtype=np.float64)
    models = [
        ("unigram, add-½", "unigram", AddHalfUnigram(train_docs, vocab_size), ""),
        *[(f"interpolated Kneser-Ney {name}", f"kn{order}", KneserNey(train_docs, vocab_size, order), "")
          for order, name in ((2, "bigram"), (3, "trigram"))],
    ]
    rows = []
    for label, key, model, note in models:
        nll = np.array([-model.token_log_probs(d).sum() for d in test_docs])
        discounts = getattr(model, "discounts", None)
        if discounts is not None:
            note = "discounts " + ", ".join(f"{d:.2f}" for d in discounts)
        rows.append(Row(label, key, nll, tokens, note))
    return rows


def smollm2_rows(lm, tokenizer, test_docs, window: int) -> list[Row]:
    """SmolLM2 with a ``window``-token sliding window and with the whole document."""
    from vmt.benchmarks.streaming_ppl import recomputed_window_nll
    from vmt.memory import streaming_nll

    start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if not isinstance(start, int) or start < 0:
        start = tokenizer.eos_token_id
    tokens = np.array([len(d) for d in test_docs], dtype=np.float64)
    windowed, whole = [], []
    for doc in test_docs:
        ids = torch.cat([torch.tensor([start], dtype=torch.long), doc.long()])
        windowed.append(float(recomputed_window_nll(lm, ids, window, window // 2).sum()))
        whole.append(float(streaming_nll(lm, ids, None, chunk_size=512).sum()))
    return [
        Row(f"SmolLM2-135M, {window}-token sliding window", f"smollm2_window{window}",
            np.array(windowed), tokens, f"recomputed every {window // 2} tokens"),
        Row("SmolLM2-135M, whole document", "smollm2_document", np.array(whole), tokens),
    ]


def gru_row(train_docs, test_docs, full_vocab: int, parameters: int, cpu_seconds: float,
            vocab_max_size: int, seed: int = 0, variant: tuple = GRU_VARIANTS[0],
            valid_docs=None, teacher=None) -> Row:
    """A GRU LM with at most ``parameters`` parameters trained for ``cpu_seconds``.

    ``variant`` is one of :data:`GRU_VARIANTS`; a distillation weight of ``None`` takes the
    best VMT schedule's (``teacher`` holds the targets, built over the same compact
    vocabulary); validation selection uses ``valid_docs``.
    """
    from vmt.data.vocab import Vocabulary
    from vmt.nn.gru_lm import GRULanguageModel, GRUTrainConfig, document_log_probs, train_for

    key, label, dropout, select, distill = variant
    vocab = Vocabulary.build(train_docs, full_vocab, vocab_max_size)
    hidden = GRULanguageModel.hidden_for(parameters, vocab.size)
    torch.manual_seed(seed)
    model = GRULanguageModel(vocab.size, hidden, dropout=dropout)
    count = sum(p.numel() for p in model.parameters())
    valid = [vocab.encode(d) for d in valid_docs] if select and valid_docs else None
    trained = train_for(model, [vocab.encode(d) for d in train_docs], cpu_seconds,
                        GRUTrainConfig(seed=seed, distill_weight=distill or 0.0), valid=valid,
                        teacher=teacher if distill else None)
    penalty = vocab.token_penalty.double()
    nll = []
    for doc in test_docs:
        ids = vocab.encode(doc)
        nll.append(float(-document_log_probs(model, ids).sum() + penalty[ids].sum()))
    tokens = np.array([len(d) for d in test_docs], dtype=np.float64)
    note = (f"hidden {hidden}, {count:,} parameters, {trained['steps']} steps, "
            f"{trained['cpu_seconds']:.0f} CPU s; vocabulary {vocab.size - 1} + <unk>")
    if "best_step" in trained:
        note += f"; kept step {trained['best_step']} (validation {trained['best_valid_nll']:.3f}, compact)"
    if distill:
        note += f"; distillation weight {distill:g}"
    extra = {"params": count, "hidden": hidden, "steps": trained["steps"],
             "cpu_seconds": trained["cpu_seconds"], "budget_params": parameters,
             "budget_cpu_seconds": cpu_seconds, "best_step": trained.get("best_step", trained["steps"])}
    return Row(label, key, np.array(nll), tokens, note, extra)


def generative_parameters(vmt: VariationalMarkovTransformer, trainable_only: bool = True) -> int:
    """Parameters of the generative part (prior, forward transition, emission, and the token
    family's shared embeddings and head), each counted once."""
    parts = [vmt.prior, vmt.transition, vmt.emission]
    if getattr(vmt, "tokens", None) is not None:
        parts.append(vmt.tokens)
    seen = {id(p): p for part in parts for p in part.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad or not trainable_only)


def vmt_rows(presets_schedules, settings: Settings = FULL, texts: list[str] | None = None,
             corpus_name: str = "pydoc", root: str | Path = "runs/bench/text-lm",
             test_fingerprint: str | None = None) -> list[Row]:
    """Fit each ``(preset, schedule)`` with :func:`vmt.experiment.run_text` and score it.

    The schedule keeps its training budget (unless ``settings`` overrides it) but takes the
    benchmark's document split and held-out cap, so every row scores the same documents
    (checked against ``test_fingerprint`` when given). Each row's value is the IWAE-k bound;
    ``extra`` holds the diagnostics, the generative part's parameter count and the SVI CPU
    seconds (the GRU's budget).
    """
    from vmt import experiment

    rows = []
    for preset_name, schedule_name in presets_schedules:
        preset = experiment.ModelPreset.from_dict(
            experiment.load_json(experiment.resolve_config(preset_name, "models")))
        schedule = experiment.Schedule.from_dict(
            experiment.load_json(experiment.resolve_config(schedule_name, "inference")))
        train = schedule.train
        if settings.vmt_steps is not None:
            steps = settings.vmt_steps
            train = replace(train, steps=steps, annealing_steps=min(train.annealing_steps, steps // 2),
                            lr_decay_steps=steps if train.lr_decay_steps else 0,
                            steps_per_length=min(train.steps_per_length, max(1, steps // 20)),
                            checkpoint_every=steps, log_every=min(train.log_every, steps))
        changes = {"train": train, "max_test_tokens": settings.test_tokens or 10**12,
                   "split_seed": settings.split_seed, "valid_fraction": settings.valid_fraction,
                   "test_fraction": settings.test_fraction, "reverse_steps": 0}
        if settings.vmt_train_tokens is not None:
            changes["max_train_tokens"] = settings.vmt_train_tokens
        if settings.vmt_particles is not None:
            changes["eval_particles"] = settings.vmt_particles
        schedule = replace(schedule, **changes)
        shown = [Path(n).stem if n.endswith(".json") else n for n in (preset_name, schedule_name)]
        out = Path(root) / "+".join(shown)
        logger.info("VMT %s + %s: %d SVI steps on at most %d tokens", preset_name, schedule_name,
                    schedule.train.steps, schedule.max_train_tokens)
        import pyro

        pyro.set_rng_seed(settings.split_seed)  # the guide's draws: the row reproduces
        result = experiment.run_text(preset, schedule, out, texts, corpus_name, resume=False,
                                     progress=False)
        if test_fingerprint is not None and result.text_run.test_corpus.fingerprint != test_fingerprint:
            raise RuntimeError(f"the VMT {preset_name}+{schedule_name} was scored on another held-out split")
        test = result.test
        docs = sorted(test.per_document, key=lambda d: d.index)
        nll = np.array([d.neg_iwae for d in docs])
        tokens = np.array([d.tokens for d in docs], dtype=np.float64)
        history = result.train.history
        extra = {
            "iwae": test.iwae_per_token, "neg_elbo": test.neg_elbo_per_token,
            "reconstruction": test.reconstruction_per_token, "kl": test.kl_per_token,
            "oov": test.oov_per_token, "particles": test.particles,
            "explained_variance_max": test.explained_variance_max,
            "explained_variance_mean": test.explained_variance_mean,
            "explained_dims": test.explained_dims, "active_units": test.active_units,
            "prior_variance_fraction_max": test.prior_variance_fraction_max,
            "mutual_information": test.mutual_information,
            "mutual_information_nce": test.mutual_information_nce,
            "state_dim": result.model.config.state_dim,
            "params": generative_parameters(result.model),
            "params_all": generative_parameters(result.model, trainable_only=False),
            "cpu_seconds": history[-1]["cpu_seconds"] if history else 0.0,
            "steps": result.train.steps, "train_tokens": result.text_run.train_corpus.num_tokens,
            "distill_weight": schedule.train.distill_weight,
        }
        note = (f"IWAE-{test.particles}; {extra['steps']} SVI steps on {extra['train_tokens']:,} "
                f"tokens, {extra['cpu_seconds']:.0f} CPU s; generative part {extra['params']:,} parameters")
        rows.append(Row(f"VMT `{shown[0]}` + `{shown[1]}`", _key(f"vmt {shown[0]} {shown[1]}"),
                        nll, tokens, note, extra))
    return rows


# -- the benchmark ----------------------------------------------------------------------------
def measure(settings: Settings, texts: list[str] | None = None, corpus_name: str = "pydoc",
            root: str | Path = "runs/bench/text-lm"):
    """Every row on one split: ``(rows, split description)``."""
    from vmt import experiment

    schedule = experiment.Schedule(
        max_train_tokens=settings.train_tokens or 10**12, max_test_tokens=settings.test_tokens or 10**12,
        valid_fraction=settings.valid_fraction, test_fraction=settings.test_fraction,
        split_seed=settings.split_seed)
    split = experiment.TextRun(experiment.ModelPreset(), schedule, texts, corpus_name, progress=False)
    train_docs = list(split.train_corpus.documents)
    test_docs = list(split.test_corpus.documents)
    full_vocab = split.train_corpus.vocab_size
    logger.info("split: %d training tokens (%d documents), %d held-out tokens (%d documents)",
                split.train_corpus.num_tokens, len(train_docs), split.test_corpus.num_tokens, len(test_docs))
    vmts = vmt_rows(settings.presets, settings, texts, corpus_name, root,
                    split.test_corpus.fingerprint) if settings.presets else []
    rows = ngram_rows(train_docs, test_docs, full_vocab)
    if vmts:
        best = min(vmts, key=lambda r: r.per_token)
        valid_docs = list(split.valid_corpus.documents)
        for variant in settings.gru_variants:
            teacher, distill = None, variant[4]
            if distill is None:  # distilled like the best VMT (no row if it was not distilled)
                distill = best.extra["distill_weight"]
                if not distill > 0:
                    continue
                from vmt.data.vocab import Vocabulary

                vocab = Vocabulary.build(train_docs, full_vocab, settings.vocab_max_size)
                teacher = split.teacher(split.train_corpus, vocab)
                variant = (*variant[:4], distill)
            logger.info("GRU row %s", variant[0])
            rows.append(gru_row(train_docs, test_docs, full_vocab, best.extra["params"],
                                best.extra["cpu_seconds"], settings.vocab_max_size, settings.split_seed,
                                variant, valid_docs, teacher))
    logger.info("SmolLM2 rows")
    rows += smollm2_rows(split.lm, split.tokenizer, test_docs, settings.window)
    info = {"train_tokens": split.train_corpus.num_tokens, "train_documents": len(train_docs),
            "test_tokens": split.test_corpus.num_tokens, "test_documents": len(test_docs),
            "vocab_size": full_vocab, "corpus": corpus_name}
    return rows + vmts, info


def _plot(rows: list[Row], intervals: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = np.arange(len(rows))[::-1]
    values = [r.per_token for r in rows]
    lo = [r.per_token - intervals[r.key][0] for r in rows]
    hi = [intervals[r.key][1] - r.per_token for r in rows]
    colors = ["C3" if r.key.startswith("vmt") else "C0" for r in rows]
    ax.barh(ys, values, xerr=[lo, hi], color=colors, alpha=0.8, capsize=3)
    ax.set_yticks(ys, [r.label.replace("`", "") for r in rows], fontsize=8)
    ax.set_xlabel("held-out nats / token (full vocabulary)\n95% bootstrap interval over documents")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(quick: bool, figure_dir: Path, text: list[str] | None = None) -> BenchResult:
    # the preset list is read at run time, so an edit of VMT_PRESETS always takes effect
    settings = replace(QUICK if quick else FULL, presets=tuple(VMT_PRESETS))
    texts, corpus = None, "pydoc"
    if text:
        from vmt.data.corpus import read_text_files

        texts, corpus = read_text_files(text), "user-text"
    rows, info = measure(settings, texts, corpus, Path("runs/bench/text-lm") / ("quick" if quick else "full"))
    return summarise(rows, info, settings, quick, figure_dir)


def summarise(rows: list[Row], info: dict, settings: Settings, quick: bool, figure_dir: Path) -> BenchResult:
    """Intervals, metrics, the results-page section and the plot of measured rows."""
    corpus = info["corpus"]
    draws = bootstrap_indices(len(rows[0].tokens))
    intervals = {r.key: ratio_interval(r.nll, r.tokens, draws) for r in rows}
    metrics: dict[str, float] = {}
    for r in rows:
        metrics[f"nats_per_token_{r.key}"] = r.per_token
        metrics[f"nats_per_token_{r.key}_ci_low"], metrics[f"nats_per_token_{r.key}_ci_high"] = intervals[r.key]
        for name, value in r.extra.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{r.key}_{name}"] = value
    table = markdown_table(
        ["model", "held-out nats / token", "95% interval", "perplexity", "notes"],
        [[r.label, r.per_token, f"[{intervals[r.key][0]:.3f}, {intervals[r.key][1]:.3f}]",
          math.exp(r.per_token), r.note] for r in rows])
    vmts = [r for r in rows if r.key.startswith("vmt")]
    by_key = {r.key: r for r in rows}
    parts = [
        f"Held-out split: {info['test_tokens']:,} tokens in {info['test_documents']} document(s); "
        f"the n-gram and GRU rows train on {info['train_tokens']:,} tokens "
        f"({info['train_documents']} documents) of "
        + ("`pydoc_data.topics`" if corpus == "pydoc" else "the given text files")
        + ", split by document. Every number is nats per token over SmolLM2's full "
        f"{info['vocab_size']:,}-token vocabulary (the VMT and GRU pay `log(#merged ids)` for a "
        "token outside their compact vocabulary); intervals are 95% percentile bootstraps over "
        f"held-out documents ({BOOTSTRAP_DRAWS} draws, ratio of sums, the same draws for every row).",
        table,
    ]
    if vmts:
        best = min(vmts, key=lambda r: r.per_token)
        diag = markdown_table(
            ["VMT", "IWAE-k", "−ELBO", "reconstruction", "KL", "OOV", "explained var. max / mean",
             "dims > 0.1", "active units", "I(x;y) ≥ (BA / InfoNCE)"],
            [[r.label, r.extra["iwae"], r.extra["neg_elbo"], r.extra["reconstruction"], r.extra["kl"],
              r.extra["oov"], _pair(r.extra["explained_variance_max"], r.extra["explained_variance_mean"]),
              _of(r.extra["explained_dims"], r.extra["state_dim"]),
              _of(r.extra["active_units"], r.extra["state_dim"]),
              _pair(r.extra["mutual_information"], r.extra["mutual_information_nce"])] for r in vmts])
        parts += [
            "Diagnostics of the VMT rows (nats per token on the held-out split; see "
            "`vmt.inference.evaluate`): the bound is reconstruction + KL + out-of-vocabulary; the "
            "explained variance of a state dimension is the share of its spread over positions "
            "that depends on the text.",
            diag,
        ]
        for other in ("kn3", *(v[0] for v in GRU_VARIANTS)):
            if other in by_key:
                d, lo, hi = difference_interval(best, by_key[other], draws)
                metrics[f"best_vmt_minus_{other}"] = d
                metrics[f"best_vmt_minus_{other}_ci_low"], metrics[f"best_vmt_minus_{other}_ci_high"] = lo, hi
                parts.append(f"Best VMT minus {by_key[other].label}: {d:+.3f} nats/token "
                             f"(paired 95% interval [{lo:+.3f}, {hi:+.3f}]).")
    figure = _plot(rows, intervals, Path(figure_dir) / "text_lm.png")
    parts.append(f"![held-out nats per token](figures/{figure.name})")
    config = {"quick": quick, "corpus": corpus, **info, "window": settings.window,
              "presets": [list(p) for p in settings.presets], "vmt_steps": settings.vmt_steps,
              "vmt_train_tokens": settings.vmt_train_tokens, "bootstrap_draws": BOOTSTRAP_DRAWS}
    return BenchResult(NAME, metrics, config, "\n\n".join(parts), [figure])


def _pair(a, b) -> str:
    if a is None or b is None:
        return "–"
    return f"{a:.3f} / {b:.3f}"


def _of(n, d) -> str:
    return "–" if n is None else f"{n} of {d}"
