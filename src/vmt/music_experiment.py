"""Piano-roll runs from configuration files: ``vmt fit --model jsb --schedule jsb-hour --data PATH``.

A **music preset** (``models/NAME.json`` with ``"data": "piano-roll"``) names the VMT's sizes
for ``(time, 88)`` piano rolls (a Bernoulli emission) and the width of the GRU that reads each
piece in reverse for the guide; ``obs_dim`` and ``feature_dim`` are derived. A **music
schedule** (``inference/NAME.json``) holds the SVI settings and what makes a run a *budgeted*
one:

* ``max_cpu_seconds``: the process CPU time spent in SVI steps (``time.process_time``; one
  thread is the intended setting, ``OMP_NUM_THREADS=1``) stays within it: the last stretch
  before a validation is cut to the steps the remaining budget allows at the rate measured
  so far;
* validation-based stopping: every ``eval_every`` steps the negative ELBO of the validation
  split is measured (``valid_particles`` draws, a fixed seed, outside the training random
  stream); the best model so far is kept in ``OUT/best``, and ``patience`` evaluations without
  improvement stop the run (0: never). The test split is scored with the best model.

Long runs resume: the trainer's checkpoint (``OUT/checkpoint``) is written at every
validation, and ``OUT/progress.json`` holds the CPU time spent, the validation curve and the
best step, so running the same command again continues where the run stopped (Ctrl-C or
SIGTERM save first). A non-finite loss stops training; the best validated model is still
evaluated. Progress is logged at every validation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vmt.inference.evaluate import EvalResult, evaluate
from vmt.inference.train import TrainConfig, Trainer, run_steps

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

logger = logging.getLogger(__name__)

PIANO_ROLL = "piano-roll"
VALID_SEED = 1234
TEST_SEED = 4321


def is_music_preset(data: dict) -> bool:
    """Whether a preset's (or schedule's) JSON object is for piano rolls (``"data":
    "piano-roll"``)."""
    return isinstance(data, dict) and data.get("data") == PIANO_ROLL


def parse_config(data: dict, folder: str):
    """A shipped or local configuration of either kind: a :class:`MusicPreset` /
    :class:`MusicSchedule` for piano-roll ones, else :class:`vmt.experiment.ModelPreset` /
    :class:`vmt.experiment.Schedule` (``folder`` is ``"models"`` or ``"inference"``)."""
    from vmt.experiment import ModelPreset, Schedule

    if folder not in ("models", "inference"):
        raise ValueError(f"configuration folder must be 'models' or 'inference', got {folder!r}")
    if is_music_preset(data):
        return (MusicPreset if folder == "models" else MusicSchedule).from_dict(data)
    return (ModelPreset if folder == "models" else Schedule).from_dict(data)


def _known(cls, data: dict, what: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown} (known: {sorted(known)})")
    return data


@dataclass(frozen=True)
class MusicPreset:
    """A piano-roll VMT: ``vmt`` settings (:class:`~vmt.models.config.VMTConfig` fields,
    ``emission`` Bernoulli, ``obs_dim``/``feature_dim`` derived) and the reverse GRU reader's
    width ``reader_hidden`` (its output is the guide's feature)."""

    vmt: dict = field(default_factory=dict)
    reader_hidden: int = 128
    data: str = PIANO_ROLL
    description: str = ""

    def __post_init__(self) -> None:
        from vmt.models.config import VMTConfig

        if self.data != PIANO_ROLL:
            raise ValueError(f"a music preset has data {PIANO_ROLL!r}, got {self.data!r}")
        _known(VMTConfig, self.vmt, "vmt")
        for derived in ("obs_dim", "feature_dim"):
            if derived in self.vmt:
                raise ValueError(f"{derived} is derived from the data and reader; remove it from the preset")
        if self.vmt.get("emission", "bernoulli") != "bernoulli":
            raise ValueError(f"piano rolls need vmt.emission 'bernoulli', got {self.vmt['emission']!r}")
        if isinstance(self.reader_hidden, bool) or not isinstance(self.reader_hidden, int) or self.reader_hidden < 1:
            raise ValueError(f"reader_hidden must be a positive integer, got {self.reader_hidden!r}")
        self.config(88)  # every VMTConfig check, now

    @classmethod
    def from_dict(cls, data: dict) -> MusicPreset:
        return cls(**_known(cls, data, "music preset"))

    def config(self, obs_dim: int):
        from vmt.models.config import VMTConfig

        return VMTConfig(**{"emission": "bernoulli", **self.vmt, "obs_dim": obs_dim,
                            "feature_dim": self.reader_hidden})

    def reader_spec(self, obs_dim: int) -> dict:
        return {"kind": "gru", "kwargs": {"input": "features", "hidden_size": self.reader_hidden,
                                          "feature_dim": obs_dim}}

    def build(self, obs_dim: int = 88):
        """A fresh VMT (parameters drawn from torch's global random stream)."""
        from vmt.models import VariationalMarkovTransformer

        return VariationalMarkovTransformer(self.config(obs_dim), reader_spec=self.reader_spec(obs_dim))


@dataclass(frozen=True)
class MusicSchedule:
    """SVI settings of a budgeted piano-roll run (see the module docstring).

    Attributes:
        train: the SVI settings (``steps`` is the most the run takes).
        max_cpu_seconds: training CPU budget (process time in SVI steps; validation and test
            evaluations are accounted separately).
        eval_every: SVI steps between validations.
        valid_particles: draws per validation piece (the validation bound is their mean ELBO).
        patience: validations without improvement that stop the run (0: never).
        test_particles: ``k`` of the test IWAE bound (the test ELBO is the mean of the same draws).
        iwae_particles: ``k`` of an extra, tighter IWAE bound on the test split (0: none).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    max_cpu_seconds: float = 3600.0
    eval_every: int = 500
    valid_particles: int = 4
    patience: int = 0
    test_particles: int = 64
    iwae_particles: int = 0
    data: str = PIANO_ROLL
    description: str = ""

    def __post_init__(self) -> None:
        if self.data != PIANO_ROLL:
            raise ValueError(f"a music schedule has data {PIANO_ROLL!r}, got {self.data!r}")
        if not (isinstance(self.max_cpu_seconds, int | float) and self.max_cpu_seconds > 0):
            raise ValueError(f"max_cpu_seconds must be > 0, got {self.max_cpu_seconds!r}")
        for name in ("eval_every", "valid_particles", "test_particles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("patience", "iwae_particles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict) -> MusicSchedule:
        data = dict(_known(cls, data, "music schedule"))
        train = data.pop("train", {})
        if not isinstance(train, dict):
            raise ValueError(f"schedule.train must be a JSON object, got {train!r}")
        return cls(train=TrainConfig.from_dict(train), **data)

    def with_seed(self, seed: int) -> MusicSchedule:
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seed=seed))

    def with_budget(self, max_cpu_seconds: float) -> MusicSchedule:
        """The same schedule compressed (or stretched) to another CPU budget: ``steps`` and
        ``lr_decay_steps`` scale with the budget, so the learning rate still decays fully, and
        validation comes at least ten times per run."""
        ratio = float(max_cpu_seconds) / self.max_cpu_seconds
        steps = max(1, round(self.train.steps * ratio))
        train = dataclasses.replace(self.train, steps=steps,
                                    lr_decay_steps=round(self.train.lr_decay_steps * ratio))
        return dataclasses.replace(self, max_cpu_seconds=float(max_cpu_seconds), train=train,
                                   eval_every=max(1, min(self.eval_every, steps // 10)))


@dataclass
class MusicRunResult:
    """What :func:`run_music` measured.

    Attributes:
        steps: SVI steps taken; ``cpu_seconds``: their process CPU time.
        best_step: the step of the best validation bound (the model scored on test).
        curve: one record per validation: ``step``, ``cpu_seconds``, ``valid_neg_elbo``
            (nats per time step), ``train_neg_elbo`` (the last logged training batch).
        stopped: why training ended (``"steps"``, ``"cpu budget"``, ``"patience"``,
            ``"interrupted"`` or a non-finite diagnostic).
        valid, test: the best model's bounds; ``iwae``: the extra IWAE-k on test (or None).
        eval_cpu_seconds: CPU time of the validations; ``test_cpu_seconds`` of the test
            evaluations.
    """

    steps: int
    cpu_seconds: float
    best_step: int
    curve: list[dict]
    stopped: str
    valid: EvalResult | None = None
    test: EvalResult | None = None
    iwae: EvalResult | None = None
    eval_cpu_seconds: float = 0.0
    test_cpu_seconds: float = 0.0
    parameters: int = 0
    out: Path | None = None

    def to_dict(self) -> dict:
        def bound(ev: EvalResult | None):
            if ev is None:
                return None
            pieces = sorted(ev.per_document, key=lambda d: d.index)
            return {"particles": ev.particles, "neg_elbo": ev.neg_elbo_per_token, "iwae": ev.iwae_per_token,
                    "reconstruction": ev.reconstruction_per_token, "kl": ev.kl_per_token,
                    "steps": ev.tokens, "pieces": ev.documents,
                    "per_piece": [[d.tokens, d.neg_elbo, d.neg_iwae] for d in pieces]}

        return {"steps": self.steps, "cpu_seconds": self.cpu_seconds, "best_step": self.best_step,
                "curve": self.curve, "stopped": self.stopped, "valid": bound(self.valid),
                "test": bound(self.test), "iwae": bound(self.iwae),
                "eval_cpu_seconds": self.eval_cpu_seconds, "test_cpu_seconds": self.test_cpu_seconds,
                "parameters": self.parameters}


def _bound(vmt: VariationalMarkovTransformer, pieces, particles: int, seed: int) -> EvalResult:
    """Negative ELBO and IWAE-``particles`` of whole pieces, under a fixed seed and outside the
    global random stream.

    One piece at a time (``streams=1``), so that each piece is one window and the guide reads
    all of it: with several streams, :class:`~vmt.inference.windows.DocumentStreams` cuts the
    windows at the shortest active piece and the guide of a longer piece then reads only up to
    the cut (a valid but looser bound: 7.70 against 7.49 nats per step on the JSB test split for
    the same model).
    """
    longest = max(len(p) for p in pieces)
    was_training = vmt.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        ev = evaluate(vmt, pieces, window=longest, particles=particles, streams=1, diagnostics=False)
    vmt.train(was_training)
    return ev


def _load_progress(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it or pass --restart") from err
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def run_music(
    preset: MusicPreset,
    schedule: MusicSchedule,
    splits: dict,
    out: str | Path,
    resume: bool = True,
    accept_schedule: bool = False,
    data_name: str = "piano rolls",
) -> MusicRunResult:
    """Train a piano-roll VMT within ``schedule``'s budget, keep the best model on validation,
    and bound the test NLL per time step.

    Args:
        preset, schedule: :class:`MusicPreset`, :class:`MusicSchedule`.
        splits: ``{"train", "valid", "test"}`` lists of ``(time, 88)`` piano rolls.
        out: the run folder (``checkpoint``, ``best``, ``progress.json``, ``result.json``).
        resume: continue from ``out`` if it holds a run; otherwise start afresh (the folder's
            old run is replaced).
    """
    from vmt.checkpoint import load_checkpoint, load_state_into, save_checkpoint

    for name in ("train", "valid", "test"):
        if not splits.get(name):
            raise ValueError(f"the {name} split is empty or missing (got splits {sorted(splits)})")
    obs_dim = splits["train"][0].shape[-1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress_file, ck, best_dir = out / "progress.json", out / "checkpoint", out / "best"
    if not resume:
        import shutil

        for leftover in (progress_file, out / "result.json"):
            leftover.unlink(missing_ok=True)
        for folder in out.glob("*"):
            if folder.is_dir() and folder.name.startswith(("checkpoint", "best")):
                shutil.rmtree(folder)
            elif folder.is_symlink() and folder.name in ("checkpoint", "best"):
                folder.unlink()
    cfg = schedule.train
    torch.manual_seed(cfg.seed)
    vmt = preset.build(obs_dim)
    meta = {"data": data_name, "preset": dataclasses.asdict(preset),
            "schedule": {k: v for k, v in dataclasses.asdict(schedule).items()
                         if k not in ("train", "max_cpu_seconds", "patience", "description",
                                      "test_particles", "iwae_particles")}}
    trainer = Trainer(vmt, splits["train"], cfg, checkpoint_dir=ck, meta=meta)
    progress = _load_progress(progress_file) if resume else {}
    if resume and trainer.resume(accept_schedule):
        logger.info("resumed at step %d (%.0f CPU s of training so far)", trainer.step,
                    progress.get("cpu_seconds", 0.0))
    else:
        progress = {}
    cpu = float(progress.get("cpu_seconds", 0.0))
    eval_cpu = float(progress.get("eval_cpu_seconds", 0.0))
    curve: list[dict] = list(progress.get("curve", []))
    best = progress.get("best")  # {"step", "valid_neg_elbo"}
    stale = int(progress.get("stale", 0))
    stopped = progress.get("stopped")
    if stopped in ("interrupted", "cpu budget", "steps"):  # a larger budget continues the run
        stopped = None

    def save_progress() -> None:
        _write_json(progress_file, {"cpu_seconds": cpu, "eval_cpu_seconds": eval_cpu, "curve": curve,
                                    "best": best, "stale": stale, "stopped": stopped, "step": trainer.step})

    while stopped is None:
        if trainer.step >= cfg.steps:
            stopped = "steps"
            break
        segment = min(schedule.eval_every, cfg.steps - trainer.step)
        if curve:  # the steps the rest of the budget allows at the rate measured so far
            rate = curve[-1]["step"] / max(curve[-1]["cpu_seconds"], 1e-9)
            segment = min(segment, int((schedule.max_cpu_seconds - cpu) * rate))
        if cpu >= schedule.max_cpu_seconds or segment < 1:
            stopped = "cpu budget"
            break
        trainer.config = dataclasses.replace(cfg, steps=trainer.step + segment)
        start = time.process_time()
        res = run_steps(trainer, progress=False)
        cpu += time.process_time() - start
        if res.stopped == "interrupted":
            stopped = "interrupted"
            save_progress()
            break
        if not res.ok:
            stopped = res.stopped
            break
        start = time.process_time()
        ev = _bound(vmt, splits["valid"], schedule.valid_particles, VALID_SEED)
        eval_cpu += time.process_time() - start
        train_bound = -res.history[-1]["elbo_per_token"] if res.history else math.nan
        curve.append({"step": trainer.step, "cpu_seconds": cpu, "valid_neg_elbo": ev.neg_elbo_per_token,
                      "train_neg_elbo": train_bound})
        if best is None or ev.neg_elbo_per_token < best["valid_neg_elbo"]:
            best = {"step": trainer.step, "valid_neg_elbo": ev.neg_elbo_per_token}
            save_checkpoint(best_dir, vmt, meta={**meta, "step": trainer.step, "cpu_seconds": cpu})
            stale = 0
        else:
            stale += 1
        logger.info("step %d, %.0f CPU s: validation -ELBO %.4f nats/step (best %.4f at step %d)",
                    trainer.step, cpu, ev.neg_elbo_per_token, best["valid_neg_elbo"], best["step"])
        if schedule.patience and stale >= schedule.patience:
            stopped = "patience"
        save_progress()
    save_progress()
    result = MusicRunResult(steps=trainer.step, cpu_seconds=cpu, best_step=best["step"] if best else 0,
                            curve=curve, stopped=stopped, eval_cpu_seconds=eval_cpu,
                            parameters=sum(p.numel() for p in vmt.parameters()), out=out)
    if stopped == "interrupted" or best is None:
        return result
    load_state_into(vmt, load_checkpoint(best_dir, build_model=False).model_state, f"checkpoint {best_dir}")
    start = time.process_time()
    result.valid = _bound(vmt, splits["valid"], schedule.test_particles, VALID_SEED)
    result.test = _bound(vmt, splits["test"], schedule.test_particles, TEST_SEED)
    if schedule.iwae_particles:
        result.iwae = _bound(vmt, splits["test"], schedule.iwae_particles, TEST_SEED + 1)
    result.test_cpu_seconds = time.process_time() - start
    _write_json(out / "result.json", result.to_dict())
    return result
