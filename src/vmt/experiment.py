"""Runs from configuration files: the pipeline behind ``vmt fit``, ``vmt evaluate`` and ``vmt demo``.

A run combines a **model preset** (``models/NAME.json``: the encoder/reader and the VMT's
sizes) with a **schedule** (``inference/NAME.json``: data budget, training and evaluation
settings); both ship with vmt as package data (``vmt/configs``), and files of the same layout
in the working directory take precedence. Text runs tokenise with the pretrained LM's
tokenizer, split the corpus by document, build a compact emission vocabulary on the training
split (with an honest full-vocabulary correction, see :class:`vmt.data.vocab.Vocabulary`),
cache frozen LM features once, train, and evaluate held-out bounds.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vmt.config_fields import config_from_dict, known_fields
from vmt.inference.evaluate import EvalResult, evaluate
from vmt.inference.train import TrainConfig, TrainResult, fit
from vmt.inference.windows import emphasis_weights

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from vmt.models.vmt import VariationalMarkovTransformer

logger = logging.getLogger(__name__)

CONFIG_FOLDERS = ("models", "inference")


def _shipped(folder: str) -> Traversable:
    if folder not in CONFIG_FOLDERS:
        raise ValueError(f"configuration folder must be 'models' or 'inference', got {folder!r}")
    return resources.files("vmt") / "configs" / folder


def shipped_configs(folder: str) -> list[str]:
    """Names of the presets (``folder="models"``) or schedules (``"inference"``) shipped with vmt."""
    return sorted(e.name[: -len(".json")] for e in _shipped(folder).iterdir() if e.name.endswith(".json"))


def resolve_config(name_or_path: str, folder: str) -> Path | Traversable:
    """A run configuration: a path to a JSON file, else ``./FOLDER/NAME.json``, else the one shipped.

    ``folder`` is ``"models"`` (presets) or ``"inference"`` (schedules). Files in the working
    directory come first, so a local ``models/text-gru.json`` overrides the shipped preset; the
    shipped ones are package data of :mod:`vmt` (``vmt/configs/FOLDER``), read with
    :mod:`importlib.resources`, so they are found from any directory once vmt is installed.
    """
    shipped = _shipped(folder)
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    local = Path.cwd() / folder / f"{name_or_path}.json"
    if local.is_file():
        return local
    candidate = shipped / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    here = Path.cwd() / folder
    known = sorted(p.stem for p in here.glob("*.json")) if here.is_dir() else []
    known = sorted(set(known) | set(shipped_configs(folder)))
    raise FileNotFoundError(f"no {folder} configuration {name_or_path!r} (known: {known})")


def load_json(path: str | Path | Traversable) -> dict:
    """The JSON object in a file (a path, or a :func:`resolve_config` result)."""
    source = Path(path) if isinstance(path, str) else path
    try:
        data = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def _checked_fields(cls, data, what: str) -> dict:
    """``data`` as keyword arguments of dataclass ``cls``: unknown keys and values of the
    wrong type are a ValueError naming them."""
    import dataclasses

    known_fields(cls, data, what)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        default = fields[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{what}.{name} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)) and not (value is None and name == "vocab_max_size"):
            raise ValueError(f"{what}.{name} must be an integer, got {value!r}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{what}.{name} must be a number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{what}.{name} must be a string, got {value!r}")
    return data


def _without_derived_sizes(vmt: dict) -> dict:
    """A preset's ``vmt`` entry, refused if it sets a size derived from the data and encoder."""
    for derived in ("obs_dim", "feature_dim"):
        if isinstance(vmt, dict) and derived in vmt:
            raise ValueError(f"{derived} is derived from the data and encoder; remove it from the preset")
    return vmt


def _train_config(train) -> TrainConfig:
    """A schedule's ``train`` entry as a :class:`TrainConfig`."""
    if not isinstance(train, dict):
        raise ValueError(f"schedule.train must be a JSON object, got {train!r}")
    return TrainConfig.from_dict(train)


@dataclass(frozen=True)
class EncoderSpec:
    """Who reads the text for the guide.

    ``kind="lm"``: a frozen pretrained LM read in reverse, features cached (``name``, ``layer``,
    ``window``, ``overlap``). ``kind="gru"`` / ``"transformer"``: a small reverse reader over
    tokens trained from scratch with the VMT (``hidden``). ``kind="folded"``: a folded
    (segment-recurrent) transformer reading in reverse, segments of ``segment`` tokens.
    With a trained reader, ``name="char"`` tokenises by character (printable ASCII, no LM is
    loaded: small runs and tests); otherwise ``name``'s tokenizer is used.
    """

    kind: str = "lm"
    name: str = "smollm2-135m-instruct"
    layer: int = 12
    window: int = 128
    overlap: bool = True
    hidden: int = 64
    segment: int = 16

    def __post_init__(self) -> None:
        _checked_fields(EncoderSpec, self.__dict__, "encoder")
        for name in ("layer", "window", "hidden", "segment"):
            if getattr(self, name) < (0 if name == "layer" else 1):
                raise ValueError(f"encoder.{name} must be >= {0 if name == 'layer' else 1}, got {getattr(self, name)}")
        if self.kind not in ("lm", "gru", "transformer", "folded"):
            raise ValueError(
                f"encoder kind must be 'lm', 'gru', 'transformer' or 'folded', got {self.kind!r}"
            )
        if self.kind == "lm" and self.name == "char":
            raise ValueError("encoder name 'char' (a character tokenizer) needs a trained reader, not kind 'lm'")


@dataclass(frozen=True)
class ModelPreset:
    """A named model: encoder plus VMT settings (``obs_dim``/``feature_dim`` are derived)."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    vmt: dict = field(default_factory=dict)
    vocab_max_size: int | None = 4096
    description: str = ""

    def __post_init__(self) -> None:
        if self.vocab_max_size is not None and (
                isinstance(self.vocab_max_size, bool) or not isinstance(self.vocab_max_size, int)
                or self.vocab_max_size < 2):
            raise ValueError(f"vocab_max_size must be an integer >= 2 (or null), got {self.vocab_max_size!r}")
        if not isinstance(self.vmt, dict):
            raise ValueError(f"the preset's vmt entry must be a JSON object, got {self.vmt!r}")
        from vmt.models.config import VMTConfig

        _checked_fields(VMTConfig, self.vmt, "vmt")
        emission = self.vmt.get("emission", "categorical")
        if emission not in ("categorical", "token"):
            raise ValueError(f"text runs need vmt.emission 'categorical' or 'token' (token ids), got {emission!r}")

    @classmethod
    def from_dict(cls, data: dict) -> ModelPreset:
        """The preset of a JSON object; unknown keys (here or in ``encoder``) are a ``ValueError``."""
        data = {"encoder": {}, **_checked_fields(ModelPreset, data, "preset")}
        return config_from_dict(cls, data, "preset", nested={
            "encoder": lambda enc: EncoderSpec(**_checked_fields(EncoderSpec, enc, "encoder")),
            "vmt": _without_derived_sizes,
        })


@dataclass(frozen=True)
class Schedule:
    """Data budget, training and evaluation settings of a run.

    ``emphasis_cue``: text whose tokens, wherever they occur in a training document, mark the
    next position as one whose ELBO term the loss weights by ``train.emphasis`` (e.g. the prompt
    before an answer that only a carried memory can give); needed when ``train.emphasis`` is
    not 1, and then it must occur in the training documents.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_tokens: int = 30000
    max_test_tokens: int = 4000
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    eval_window: int = 128
    eval_particles: int = 8
    reverse_steps: int = 0
    emphasis_cue: str = ""

    def __post_init__(self) -> None:
        if (self.train.emphasis != 1) != bool(self.emphasis_cue):
            raise ValueError(f"train.emphasis {self.train.emphasis} and emphasis_cue {self.emphasis_cue!r} go "
                             "together: give both (emphasis != 1 and a cue) or neither")
        for name in ("max_train_tokens", "max_test_tokens", "eval_window", "eval_particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reverse_steps < 0:
            raise ValueError(f"reverse_steps must be >= 0, got {self.reverse_steps}")

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        """The schedule of a JSON object (a ``description`` is dropped); unknown keys, here or
        in ``train``, are a ``ValueError`` naming them."""
        data = {"train": {}, **known_fields(Schedule, data, "schedule", ignore=("description",))}
        _checked_fields(Schedule, {k: v for k, v in data.items() if k != "train"}, "schedule")
        return config_from_dict(cls, data, "schedule", nested={"train": _train_config})


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving; nothing was evaluated."""

    def __init__(self, result: TrainResult):
        self.result = result
        saved = f"checkpoint saved to {result.checkpoint}" if result.checkpoint else "no checkpoint was saved"
        super().__init__(f"interrupted ({result.signal or 'SIGINT'}) at step {result.steps}; {saved}; "
                         "run the same command again to resume")


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss, gradient or parameter (the message says what was kept)."""


@dataclass
class RunResult:
    train: TrainResult
    test: EvalResult
    checkpoint: Path | None
    curve: Path | None
    model: object = None
    text_run: TextRun | None = None
    vocabulary: object = None


@dataclass
class DemoUsage:
    """What :func:`demo_usage` read, wrote and plotted.

    ``continuation_nll`` and ``bigram_sample_nll`` are the mean NLL (nats/token) under the
    pretrained LM, given the same read context, of the VMT's continuation and of a sample of
    the same length from the Kneser–Ney bigram fitted on the training split (``None`` without
    a pretrained LM).
    """

    tokens_read: int
    windows: int
    neg_elbo_per_token: float
    continuation: str
    trajectory_plot: Path
    prequel: str | None = None
    continuation_nll: float | None = None
    bigram_sample_nll: float | None = None


@dataclass(frozen=True)
class SplitBaselines:
    """Held-out NLL (nats/token over the LM's full vocabulary) of reference models on a run's
    split: add-½ unigram and Kneser–Ney bigram fitted on its training split, and the
    pretrained LM reading each whole held-out document (``None`` without one)."""

    tokens: int
    unigram: float
    bigram: float
    lm_document: float | None


class TextRun:
    """Everything a text run needs, built once: tokenizer, splits, vocabulary, features."""

    def __init__(self, preset: ModelPreset, schedule: Schedule, texts: list[str] | None = None,
                 corpus_name: str = "pydoc", progress: bool = True):
        from vmt.data.corpus import pydoc_texts, tokenize
        from vmt.encoders.pretrained import load_pretrained_lm

        self.preset, self.schedule = preset, schedule
        if preset.encoder.name == "char":
            from vmt.data.corpus import CharTokenizer

            self.lm, self.tokenizer = None, CharTokenizer()
        else:
            self.lm, self.tokenizer = load_pretrained_lm(preset.encoder.name)
        corpus = tokenize(texts if texts is not None else pydoc_texts(), self.tokenizer, corpus_name)
        train, valid, test = corpus.split(schedule.valid_fraction, schedule.test_fraction, schedule.split_seed)
        self.train_corpus = train.truncate(schedule.max_train_tokens)
        self.valid_corpus = valid.truncate(schedule.max_test_tokens)
        self.test_corpus = test.truncate(schedule.max_test_tokens)
        self.progress = progress

    def vocabulary(self, kept: list[int] | None = None):
        from vmt.data.vocab import Vocabulary

        if kept is not None:
            return Vocabulary(tuple(kept), self.train_corpus.vocab_size)
        return Vocabulary.build(self.train_corpus.documents, self.train_corpus.vocab_size, self.preset.vocab_max_size)

    def features(self, corpus):
        """A lookup ``i -> (features, ahead)`` from the frozen LM's cache (``None`` for readers)."""
        enc = self.preset.encoder
        if enc.kind != "lm":
            return None, None
        from vmt.encoders.cache import FeatureCache
        from vmt.encoders.features import LMFeatureExtractor

        extractor = LMFeatureExtractor(self.lm, layer=enc.layer, direction="reverse", model_name=enc.name)
        cache = FeatureCache.build(extractor, corpus, window=enc.window, overlap=enc.overlap, progress=self.progress)
        return cache.__getitem__, cache.hidden_size

    def teacher(self, corpus, vocab):
        """The pretrained LM's teacher-forced next-token distributions over ``corpus``, mapped
        into ``vocab`` (cached; see :class:`vmt.encoders.teacher.TeacherTargets`)."""
        from vmt.encoders.teacher import TeacherTargets

        if self.lm is None:
            raise ValueError("distillation needs a pretrained LM (the preset's encoder.name)")
        tok = self.tokenizer
        bos = tok.bos_token_id if getattr(tok, "bos_token_id", None) is not None else tok.eos_token_id
        key = f"{self.preset.encoder.name}|{corpus.fingerprint}|{hash_ids(vocab.kept)}"
        return TeacherTargets.build(self.lm, corpus.documents, vocab.encode, bos_id=int(bos), key=key,
                                    progress=self.progress)

    def build_vmt(self, vocab, feature_dim: int | None):
        from vmt.models import VariationalMarkovTransformer, VMTConfig

        enc = self.preset.encoder
        reader_spec = None
        if enc.kind == "folded":
            reader_spec = {"kind": "folded", "kwargs": {"segment_length": enc.segment, "d_model": enc.hidden,
                                                        "d_ff": 2 * enc.hidden, "vocab_size": vocab.size}}
            feature_dim = enc.hidden
        elif enc.kind != "lm":
            reader_spec = {"kind": enc.kind, "kwargs": {"input": "tokens", "hidden_size": enc.hidden,
                                                        "vocab_size": vocab.size}}
            feature_dim = enc.hidden
        config = VMTConfig(obs_dim=vocab.size, feature_dim=feature_dim,
                           max_window=max(enc.window, self.schedule.train.max_length,
                                          self.schedule.train.window, self.schedule.eval_window),
                           **self.preset.vmt)
        vmt = VariationalMarkovTransformer(config, reader_spec=reader_spec)
        if config.token_basis_dim:
            vmt.tokens.set_basis(self.token_basis(vocab, config.token_basis_dim))
        return vmt

    def token_basis(self, vocab, dim: int) -> torch.Tensor:
        """``(vocab, dim)``: the pretrained LM's input embedding of every kept token (``<unk>``:
        the mean embedding of the ids merged into it), reduced to its ``dim`` leading
        principal components when ``dim`` is smaller than the LM's hidden size."""
        if self.lm is None:
            raise ValueError("token_basis_dim needs a pretrained LM (the preset's encoder.name)")
        table = self.lm.get_input_embeddings().weight.detach().float()
        if dim > table.shape[1]:
            raise ValueError(f"token_basis_dim is {dim} but the LM's embeddings have only {table.shape[1]} dims")
        kept = torch.tensor(vocab.kept, dtype=torch.long)
        merged = torch.ones(table.shape[0], dtype=torch.bool)
        merged[kept] = False
        rows = torch.cat([table[merged].mean(0, keepdim=True), table[kept]])  # (vocab, hidden)
        if dim < rows.shape[1]:
            centred = rows - rows.mean(0)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            rows = centred @ vh[:dim].T  # (vocab, dim)
        return rows


def run_text(preset: ModelPreset, schedule: Schedule, out_dir: str | Path, texts: list[str] | None = None,
             corpus_name: str = "pydoc", resume: bool = True, progress: bool = True,
             accept_schedule: bool = False) -> RunResult:
    """Fit a text VMT and evaluate it on the held-out split; writes into ``out_dir``.

    The run folder is locked while this runs (a second run into it is refused). Raises
    :class:`RunInterrupted` (after saving, without evaluating) on Ctrl-C or SIGTERM and
    :class:`TrainingStopped` on a non-finite loss, gradient or parameter.
    """
    from vmt.checkpoint import RunLock

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"run folder {out_dir} is an existing file; give a folder path")
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(out_dir / ".vmt-run.lock"):
        return _run_text(preset, schedule, out_dir, texts, corpus_name, resume, progress, accept_schedule)


def _run_text(preset, schedule, out_dir: Path, texts, corpus_name, resume, progress, accept_schedule) -> RunResult:
    run = TextRun(preset, schedule, texts, corpus_name, progress)
    vocab = run.vocabulary()
    train_lookup, feature_dim = run.features(run.train_corpus)
    torch.manual_seed(schedule.train.seed)  # the same command initialises the same model
    vmt = run.build_vmt(vocab, feature_dim)
    train_docs = [vocab.encode(d) for d in run.train_corpus.documents]
    meta = {
        "preset": {"encoder": asdict(preset.encoder), "vmt": preset.vmt,
                   "vocab_max_size": preset.vocab_max_size, "description": preset.description},
        # a cue only when there is one, so checkpoints written before the field resume
        "schedule": {k: v for k, v in asdict(schedule).items()
                     if k != "train" and not (k == "emphasis_cue" and not v)},
        "corpus": {"name": corpus_name, "fingerprint": run.train_corpus.fingerprint,
                   "train_tokens": run.train_corpus.num_tokens},
        "vocabulary": list(vocab.kept),
    }
    logger.info("training on %d tokens (%d documents), vocabulary %d + <unk>",
                run.train_corpus.num_tokens, len(run.train_corpus), vocab.size - 1)
    teacher = run.teacher(run.train_corpus, vocab) if schedule.train.distill_weight > 0 else None
    cue = emphasis_cue_ids(schedule.emphasis_cue, run.tokenizer, vocab, train_docs)
    result = fit(vmt, train_docs, schedule.train, train_lookup, out_dir / "checkpoint", resume, progress, meta,
                 accept_schedule, teacher, emphasis_cue=cue)
    if result.stopped == "interrupted":
        raise RunInterrupted(result)
    if not result.ok:
        raise TrainingStopped(f"training stopped: {result.stopped}")
    test = evaluate_text(vmt, run, vocab)
    curve = plot_training_curve(result.history, out_dir / "training_curve.png", test)
    partial = out_dir / ".results.json.partial"  # replaced whole: a kill never leaves half a file
    partial.write_text(json.dumps({
        "steps": result.steps, "stopped": result.stopped,
        "test": asdict(test), "test_perplexity_bound": test.perplexity_bound,
    }, indent=1))
    partial.replace(out_dir / "results.json")
    return RunResult(result, test, result.checkpoint, curve, vmt, run, vocab)


def emphasis_cue_ids(cue: str, tokenizer, vocab, documents) -> tuple[int, ...]:
    """The vocabulary ids of ``cue`` as the tokenizer splits it (``()`` for no cue).

    Raises a one-line ``ValueError`` when a cue token is outside the vocabulary or no position
    of ``documents`` (vocabulary ids, ``(time,)`` each) follows the cue.
    """
    if not cue:
        return ()
    ids = vocab.encode(torch.tensor(tokenizer.encode(cue, add_special_tokens=False), dtype=torch.long))
    if bool((ids == 0).any()):  # 0 is <unk>
        raise ValueError(f"emphasis_cue {cue!r} has tokens outside the run's vocabulary")
    cue_ids = tuple(int(t) for t in ids)
    hits = sum(int((emphasis_weights(d, 0, len(d), cue_ids, 2.0) > 1).sum()) for d in documents)
    if not hits:
        raise ValueError(f"emphasis_cue {cue!r}: no position of a training document follows the cue")
    logger.info("emphasis: %d positions after %r weighted", hits, cue)
    return cue_ids


def hash_ids(ids) -> str:
    """A short content hash of a list of ids (e.g. a vocabulary's kept LM ids)."""
    import hashlib

    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def reading_features(run: TextRun, vocab):
    """A feature function for :func:`vmt.inference.reading.read` over emission ids.

    With a frozen LM the window is mapped back to LM ids (``<unk>`` is shown to the LM as the
    tokenizer's unknown/end token, since the merged id is not kept) and read in reverse; with
    a trainable reader ``None`` (the VMT's own reader is used).
    """
    return lm_reading_features(run.preset.encoder, run.lm, run.tokenizer, vocab)


def unknown_token_id(tokenizer) -> int:
    """The LM id that stands for ``<unk>`` when emission ids are mapped back to LM ids."""
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    return 0 if unk is None else int(unk)


def lm_reading_features(encoder: EncoderSpec, lm, tokenizer, vocab):
    """:func:`reading_features` from its parts: ``(feature_fn, unk_id)``, ``(None, None)``
    for a trainable reader."""
    if encoder.kind != "lm":
        return None, None
    from vmt.encoders.features import LMFeatureExtractor

    extractor = LMFeatureExtractor(lm, layer=encoder.layer, direction="reverse", model_name=encoder.name)
    unk = unknown_token_id(tokenizer)

    def features(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return extractor(vocab.decode(inputs, unk_id=unk), lengths)

    return features, unk


def fit_reverse(result: RunResult, out_dir: str | Path, steps: int, progress: bool = True) -> TrainResult:
    """Train the reverse parts (``p_r``, ``q_r``) of a fitted text VMT, sharing (and freezing)
    its prior, emission and reader; the reverse guide reads *forward* LM features.

    Saves ``out_dir/checkpoint-with-reverse`` (the forward checkpoint is left as it was).
    """
    from dataclasses import replace

    from vmt.checkpoint import read_meta, save_checkpoint
    from vmt.inference.reverse import freeze_shared_parts, reverse_documents, reverse_feature_lookup

    run, vocab, vmt = result.text_run, result.vocabulary, result.model
    enc = run.preset.encoder
    lookup = None
    if enc.kind == "lm":
        from vmt.encoders.cache import FeatureCache
        from vmt.encoders.features import LMFeatureExtractor

        forward = LMFeatureExtractor(run.lm, layer=enc.layer, direction="forward", model_name=enc.name)
        cache = FeatureCache.build(forward, run.train_corpus, window=enc.window, overlap=enc.overlap,
                                   progress=progress)
        lookup = reverse_feature_lookup(cache.__getitem__)
    # (with a trainable reader, the shared reverse reader run over reversed documents is
    # already a forward reading of the original text)
    docs = reverse_documents([vocab.encode(d) for d in run.train_corpus.documents])
    freeze_shared_parts(vmt)
    # the teacher's targets are forward next-token distributions: no distillation in reverse
    config = replace(run.schedule.train, direction="reverse", steps=steps, checkpoint_every=max(steps, 1),
                     distill_weight=0.0)
    trained = fit(vmt, docs, config, lookup, progress=progress)
    if not trained.ok:
        raise RuntimeError(f"reverse training stopped: {trained.stopped}")
    meta = read_meta(result.checkpoint) if result.checkpoint else {}
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "vmt_config", "reader", "optimizer")}
    meta["reverse_train_config"] = asdict(config)
    save_checkpoint(Path(out_dir) / "checkpoint-with-reverse", vmt, meta=meta)
    return trained


def demo_usage(result: RunResult, out_dir: str | Path, max_read: int = 1024,
               continuation: int = 40, seed: int = 0) -> DemoUsage:
    """Use a fitted text VMT: read the longest held-out document (longer than one window)
    with the state carried across windows, write a continuation from the last state, write a
    prequel from the state of its first token (if the reverse parts were trained), and plot
    the posterior state trajectory of its opening."""
    from vmt.inference.generation import SamplingConfig, write
    from vmt.inference.posterior import plot_trajectories, posterior_states
    from vmt.inference.reading import ReadConfig, read

    run, vocab, vmt = result.text_run, result.vocabulary, result.model
    feature_fn, unk = reading_features(run, vocab)
    unk = 0 if unk is None else unk
    doc = max(run.test_corpus.documents, key=len)[:max_read]
    ids = vocab.encode(doc)
    window = run.preset.encoder.window
    torch.manual_seed(seed)
    with torch.no_grad():
        res = read(vmt, ids, ReadConfig(window=window, keep_path=True), feature_fn, samples=1)
        sampling = SamplingConfig(temperature=0.8, top_p=0.9)
        written = write(vmt, res.state, continuation, sampling)
        before = None
        if vmt.config.reverse and run.schedule.reverse_steps > 0:
            from vmt.inference.generation import write_prequel

            before = write_prequel(vmt, res.path[:, 0], continuation, sampling)

    def decode(tokens: torch.Tensor) -> str:
        return run.tokenizer.decode(vocab.decode(tokens, unk_id=unk).tolist())

    text = decode(written.tokens[0])
    prequel = decode(before.tokens[0]) if before is not None else None
    cont_nll = bigram_nll = None
    if run.lm is not None:
        from vmt.data.ngram import KneserNey

        generator = torch.Generator().manual_seed(seed)
        written_ids = vocab.decode(written.tokens[0], unk_id=unk)
        cont_nll = continuation_nll(run.lm, doc, written_ids)
        bigram = KneserNey(run.train_corpus.documents, run.train_corpus.vocab_size, order=2)
        sample = [int(doc[-1])]
        for _ in range(len(written_ids)):
            probs = torch.as_tensor(bigram.distribution(sample[-1:]), dtype=torch.float64)
            sample.append(int(torch.multinomial(probs, 1, generator=generator)))
        bigram_nll = continuation_nll(run.lm, doc, torch.tensor(sample[1:]))
    opening = doc[:48]
    labels = [run.tokenizer.decode([int(t)]) for t in opening]
    tree = posterior_states(vmt, ids[:48], chains=2, draws=50, window=window,
                            feature_fn=feature_fn, labels=labels, seed=seed)
    plot = plot_trajectories(tree, Path(out_dir) / "posterior_trajectory.png", states=[0, 1, 2])
    return DemoUsage(len(ids), res.windows, res.neg_elbo_per_token(), text, Path(plot), prequel,
                     cont_nll, bigram_nll)


def document_start_id(tokenizer) -> int:
    """The token a document is read after (beginning of text, else end of text)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos if bos is not None else tokenizer.eos_token_id)


def split_baselines(run: TextRun) -> SplitBaselines:
    """:class:`SplitBaselines` of a text run's held-out split."""
    from vmt.data.ngram import AddHalfUnigram, KneserNey

    train = run.train_corpus.documents
    test = [d for d in run.test_corpus.documents if len(d)]
    vocab_size = run.train_corpus.vocab_size
    tokens = sum(len(d) for d in test)
    unigram = AddHalfUnigram(train, vocab_size)
    bigram = KneserNey(train, vocab_size, order=2)
    uni = -sum(float(unigram.token_log_probs(d).sum()) for d in test) / tokens
    bi = -sum(float(bigram.token_log_probs(d).sum()) for d in test) / tokens
    lm_nll = None
    if run.lm is not None:
        from vmt.memory import streaming_nll

        start = torch.tensor([document_start_id(run.tokenizer)])
        with torch.no_grad():
            lm_nll = sum(float(streaming_nll(run.lm, torch.cat([start, d.long()]), None,
                                             chunk_size=512).sum()) for d in test) / tokens
    return SplitBaselines(tokens, uni, bi, lm_nll)


@torch.no_grad()
def continuation_nll(lm, context: torch.Tensor, continuation: torch.Tensor, max_context: int = 256) -> float:
    """Mean NLL (nats/token) of ``continuation`` under ``lm`` given the last ``max_context``
    tokens of ``context`` (both ``(time,)`` LM ids)."""
    ctx = context[-max_context:].long()
    ids = torch.cat([ctx, continuation.long()])[None]
    logp = torch.log_softmax(lm(ids).logits[0, len(ctx) - 1 : -1].float(), -1)
    return float(-logp.gather(-1, continuation.long()[:, None]).mean())


def evaluate_text(vmt: VariationalMarkovTransformer, run: TextRun, vocab) -> EvalResult:
    lookup, _ = run.features(run.test_corpus)
    docs = [vocab.encode(d) for d in run.test_corpus.documents]
    return evaluate(vmt, docs, lookup, window=run.schedule.eval_window,
                    particles=run.schedule.eval_particles, token_penalty=vocab.token_penalty)


def evaluate_checkpoint(run_dir: str | Path, particles: int | None = None, progress: bool = True,
                        texts: list[str] | None = None) -> EvalResult:
    """Rebuild a text run from its checkpoint and evaluate it on its held-out split.

    A run fitted on text files needs the same ``texts`` (checked against the stored
    fingerprint of the training split); a run on the embedded corpus takes none.
    """
    from vmt.checkpoint import find_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoint" if find_checkpoint(run_dir / "checkpoint") is not None else run_dir
    ckpt = load_checkpoint(ckpt_dir)
    meta = ckpt.meta
    missing = [k for k in ("preset", "schedule", "train_config", "corpus", "vocabulary") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} has no {missing} entries: it was not written by `vmt fit` "
                         "(load it with vmt.checkpoint.load_checkpoint)")
    preset = ModelPreset.from_dict(meta["preset"])
    sched = Schedule.from_dict({**meta["schedule"], "train": meta["train_config"]})
    if particles is not None:
        sched = Schedule(**{**sched.__dict__, "eval_particles": particles})
    name = meta["corpus"].get("name")
    if name == "pydoc" and texts is not None:
        raise ValueError(f"{run_dir} was fitted on the embedded pydoc corpus; leave out --text")
    if name != "pydoc" and texts is None:
        raise ValueError(f"{run_dir} was fitted on your text files; pass the same files with --text")
    run = TextRun(preset, sched, texts, name, progress)
    if run.train_corpus.fingerprint != meta["corpus"].get("fingerprint"):
        what = "the text files differ from" if texts is not None else "the corpus (or tokenizer) differs from"
        raise ValueError(f"{what} the ones {run_dir} was fitted on (training-split fingerprint "
                         f"{run.train_corpus.fingerprint[:12]} vs stored {str(meta['corpus'].get('fingerprint'))[:12]})")
    vocab = run.vocabulary(meta["vocabulary"])
    if vocab.size != ckpt.vmt.config.obs_dim:
        raise ValueError(f"checkpoint {ckpt_dir}: its vocabulary has {vocab.size} entries (with <unk>) but "
                         f"the model emits {ckpt.vmt.config.obs_dim}")
    return evaluate_text(ckpt.vmt, run, vocab)


def plot_training_curve(history: list[dict], path: Path, test: EvalResult | None = None) -> Path | None:
    """Save the training curve as a PNG: the negative ELBO per token against steps, and beside
    it its two parts, reconstruction and KL per token (a collapsed posterior shows as a KL
    near zero), with the held-out values as horizontal lines."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    split = all("kl_per_token" in h for h in history)
    fig, axes = plt.subplots(1, 2 if split else 1, figsize=(11 if split else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [-h["elbo_per_token"] for h in history], label="training −ELBO / token (compact vocabulary)")
    if test is not None:
        ax.axhline(test.neg_elbo_per_token, color="C1", ls="--", label="held-out −ELBO / token (full vocabulary)")
        ax.axhline(test.iwae_per_token, color="C2", ls=":", label=f"held-out IWAE-{test.particles} / token")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("nats per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if split:
        ax = axes[0, 1]
        ax.plot(steps, [h["reconstruction_per_token"] for h in history], color="C0",
                label="training reconstruction −log p(y|x)")
        ax.plot(steps, [h["kl_per_token"] for h in history], color="C3", label="training KL")
        if test is not None and math.isfinite(test.kl_per_token):
            ax.axhline(test.reconstruction_per_token, color="C0", ls="--", label="held-out reconstruction")
            ax.axhline(test.kl_per_token, color="C3", ls="--", label="held-out KL")
        ax.set_xlabel("SVI step")
        ax.set_ylabel("nats per token (compact vocabulary)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def set_threads() -> None:
    """Use every core for intra-op parallelism (the default may be lower in some shells),
    unless ``OMP_NUM_THREADS`` asks for a number explicitly (e.g. on a shared machine)."""
    import os

    asked = os.environ.get("OMP_NUM_THREADS", "").strip()
    if asked.isdigit() and int(asked) >= 1:
        torch.set_num_threads(int(asked))
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
