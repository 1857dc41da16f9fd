"""SVI training loops for both regimes, apart from the model, returning typed results.

* ``regime="subsequence"``: random contiguous subsequences with a length curriculum; with
  ``suffix_parallel`` every selected suffix of each sample gets its own ELBO in one pass
  (budget ``N`` states, longest first); loss = mean negative ELBO over subsequences, divided
  by their mean length so the scale is per token.
* ``direction="reverse"``: the same loops train the reverse VMT (``p_r``, ``q_r``) on
  documents given in reverse time order, with features of the forward reading reversed
  alongside (a suffix of the reversed sequence is a prefix of the original: this is the
  prefix-parallel ELBO of the reverse model).
* ``regime="windows"``: batched truncated BPTT over whole documents with carried states;
  loss = ``-ELBO/tokens + w * (L_init + L_prior + L_skip)``.

Both: KL annealing (a factor passed to the loss, rising linearly), an optional cosine
learning-rate decay (``lr_decay_steps``), gradient clipping,
checkpoints (crash-safe, see :mod:`vmt.checkpoint`; every ``checkpoint_every`` steps, at the
end, and on Ctrl-C or SIGTERM, after which the run stops), resume (the same loss curve
continues: model, optimiser, RNG and carried states are restored; a checkpoint written for
other data, vocabulary or settings is refused, see :func:`vmt.checkpoint.check_resume`), a
lock on the checkpoint folder (one run at a time), and a non-finite loss, gradient or
parameter stops the run with a diagnostic naming what was kept (never a non-finite weight).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from vmt.checkpoint import (
    RunLock,
    check_checkpoint_path,
    check_resume,
    find_checkpoint,
    load_state_into,
    read_meta,
    read_meta_for,
    save_checkpoint,
)
from vmt.config_fields import config_from_dict
from vmt.encoders.teacher import TeacherTargets
from vmt.inference.objective import LossResult, NonFiniteLoss, optimiser_step, reseed, svi_loss
from vmt.inference.subsequences import (
    Curriculum,
    FeatureLookup,
    SubsequenceSampler,
    suffix_parallel_batch,
)
from vmt.inference.windows import DocumentStreams, StreamCursor, attach_carried, batch_to
from vmt.models.tokens import sharing_scores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one SVI run (saved in its checkpoints).

    ``lr_decay_steps`` / ``lr_final_fraction``: see :meth:`learning_rate_at`; the rate is a
    function of the step alone, so a resumed run continues the same schedule.
    """

    regime: Literal["subsequence", "windows"] = "subsequence"
    direction: Literal["forward", "reverse"] = "forward"
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 3e-3
    clip_norm: float | None = 10.0
    min_length: int = 2
    max_length: int = 64
    steps_per_length: int = 0
    suffix_parallel: bool = True
    budget: int = 4096
    window: int = 64
    overlap: bool = False
    aux_weight: float = 0.1
    max_skip: int = 8
    annealing_start: float = 1.0
    annealing_steps: int = 0
    lr_decay_steps: int = 0
    lr_final_fraction: float = 0.1
    distill_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = type(f.default)
            if f.name == "clip_norm":
                kind = float
                if value is None:
                    continue
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 (or null for no clipping), got {self.clip_norm}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.regime not in ("subsequence", "windows"):
            raise ValueError(f"regime must be 'subsequence' or 'windows', got {self.regime!r}")
        if self.direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be 'forward' or 'reverse', got {self.direction!r}")
        if not 0 <= self.aux_weight < 1:
            raise ValueError(f"aux_weight must lie in [0, 1), got {self.aux_weight}")
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_weight > 0 and self.regime != "windows":
            raise ValueError("distillation (distill_weight > 0) needs regime 'windows'")
        if self.lr_decay_steps < 0:
            raise ValueError(f"lr_decay_steps must be >= 0, got {self.lr_decay_steps}")
        if not 0 < self.lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction must lie in (0, 1], got {self.lr_final_fraction}")
        if not 0 < self.annealing_start <= 1:
            raise ValueError(f"annealing_start must lie in (0, 1], got {self.annealing_start}")
        for name in ("steps", "batch_size", "window", "budget", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        Curriculum(self.min_length, self.max_length, self.steps_per_length)

    def learning_rate_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step + 1``: constant without ``lr_decay_steps``,
        else a cosine from ``learning_rate`` down to ``learning_rate * lr_final_fraction`` over
        ``lr_decay_steps`` steps, then flat (it depends on the step alone, not on ``steps``, so
        a run can be extended or stopped early on the same schedule)."""
        if self.lr_decay_steps <= 0:
            return self.learning_rate
        done = min(1.0, step / self.lr_decay_steps)
        low = self.lr_final_fraction
        return self.learning_rate * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * done)))

    def annealing(self, step: int) -> float:
        """KL annealing factor at ``step``: linear from ``annealing_start`` to 1."""
        if self.annealing_steps <= 0:
            return 1.0
        return min(1.0, self.annealing_start + (1 - self.annealing_start) * step / self.annealing_steps)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The config of a JSON object; unknown keys are a ``ValueError`` naming them."""
        return config_from_dict(cls, data, "TrainConfig")


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        steps: optimiser steps completed in total (including resumed ones).
        history: one record per logged step: ``step``, ``loss``, ``elbo_per_token``,
            ``tokens_per_second``, ``annealing``, ``seconds`` and ``cpu_seconds`` (wall and
            process CPU time since this call of :func:`run_steps` began) and, when the trainer
            reports them, the split of the negative ELBO of the step's batch:
            ``reconstruction_per_token`` (``-sum log p(y_k|x_k) / tokens``) and
            ``kl_per_token`` (``sum [log q(x_k|.) - log p(x_k|x_{k-1})] / tokens``, not
            annealed).
        stopped: ``"completed"``, ``"interrupted"`` or a diagnostic of what went wrong.
        checkpoint: the last good checkpoint, if any was written.
    """

    steps: int
    history: list[dict] = field(default_factory=list)
    stopped: str = "completed"
    checkpoint: Path | None = None
    signal: str | None = None  # "SIGINT" or "SIGTERM" when interrupted

    @property
    def ok(self) -> bool:
        return self.stopped in ("completed", "interrupted")


class Trainer:
    """Runs SVI on a VMT.

    Args:
        vmt: the model (its reader, if any, trains with it).
        documents: training documents, ``(time,)`` tokens or ``(time, obs)`` arrays.
        config: :class:`TrainConfig`.
        features: lookup of cached guide features per document (frozen encoder), or
            ``None`` when the VMT has a trainable reader.
        checkpoint_dir: where checkpoints go (``None``: none are written).
        teacher: a pretrained LM's next-token distributions per document
            (:class:`~vmt.encoders.teacher.TeacherTargets`), needed when
            ``config.distill_weight > 0``: the loss then adds ``distill_weight`` times the
            cross-entropy of the VMT's next-token predictive against them (teacher-forced).
        reseed_every_step: seed the sampler generator and the global RNG of every device from
            ``(seed, step, 0)`` before each step, as
            :class:`vmt.inference.distributed.DistributedTrainer` does (then this trainer and a
            one-rank distributed run take the same steps). Default: one generator seeded with
            ``config.seed`` and the global RNG as the caller left it, both continuing from step
            to step (saved in checkpoints, with the CUDA generator of the model's device when
            it is on one, so a resume repeats the uninterrupted run).

    The loss is :func:`vmt.inference.objective.svi_loss` (this batch alone) and the step
    :func:`vmt.inference.objective.optimiser_step`, both shared with the distributed trainer.
    """

    def __init__(
        self,
        vmt,
        documents: Sequence[torch.Tensor],
        config: TrainConfig,
        features: FeatureLookup | None = None,
        checkpoint_dir: str | Path | None = None,
        meta: dict | None = None,
        teacher: TeacherTargets | None = None,
        reseed_every_step: bool = False,
    ):
        if features is None and vmt.reader is None:
            raise ValueError("give cached features or a VMT with a trainable reader")
        if config.distill_weight > 0:
            if teacher is None:
                raise ValueError("distill_weight > 0 needs teacher targets")
            if not hasattr(vmt.emission, "predictive_log_probs"):
                raise ValueError(
                    f"distillation needs an emission with a next-token predictive (the token "
                    f"family), got emission {vmt.config.emission!r}")
            if len(teacher) != len(documents):
                raise ValueError(f"teacher targets cover {len(teacher)} documents, training has {len(documents)}")
        self.teacher = teacher
        self.reseed_every_step = reseed_every_step
        self.vmt = vmt
        self.documents = list(documents)
        self.config = config
        self.features = features
        self.checkpoint_dir = check_checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
        self.meta = dict(meta or {})
        params = [p for p in vmt.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = SubsequenceSampler(self.documents, features, self.generator)
        self.curriculum = Curriculum(config.min_length, config.max_length, config.steps_per_length)
        self.step = 0
        self.history: list[dict] = []
        # the windows regime's place in the document streams and its carried states
        self.cursor: StreamCursor | None = None
        if config.regime == "windows":
            self.cursor = StreamCursor(DocumentStreams(
                self.documents, config.batch_size, config.window, features, config.overlap))

    # -- state ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        tensors = {
            "rng.torch": torch.get_rng_state(),
            "rng.sampler": self.generator.get_state(),
        }
        device = self._device()
        if device.type == "cuda":  # the guide's noise on a GPU comes from its own generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        if self.cursor is not None:
            tensors.update({f"carried.{d}": x.cpu() for d, x in self.cursor.carried.items()})
        meta = {
            **self.meta,
            "train_config": dataclasses.asdict(self.config),
            "step": self.step,
            "window_index": self.cursor.window_index if self.cursor is not None else 0,
            "history": self.history,
        }
        return save_checkpoint(self.checkpoint_dir, self.vmt, optimizer=self.optimizer, meta=meta, tensors=tensors)

    def resume(self, accept_schedule: bool = False) -> bool:
        """Continue from ``checkpoint_dir`` if it holds a checkpoint; True if it did.

        Refuses (ValueError) a checkpoint of another model config, other data or vocabulary
        (``meta``) or other training settings; changed schedule values (learning rate, clipping,
        annealing) only with ``accept_schedule``, and then they take effect.
        """
        if self.checkpoint_dir is None or find_checkpoint(self.checkpoint_dir) is None:
            return False
        from vmt.checkpoint import load_checkpoint

        # the data, vocabulary and settings first: they say why a model config differs
        now = {**self.meta, "train_config": dataclasses.asdict(self.config)}
        changed = check_resume(self.checkpoint_dir, read_meta(self.checkpoint_dir), now, accept_schedule)
        read_meta_for(self.checkpoint_dir, self.vmt.config)
        if changed:
            logger.warning("resuming with a changed schedule: %s", "; ".join(changed))
        ckpt = load_checkpoint(self.checkpoint_dir, reader=self.vmt.reader, build_model=False)
        meta = ckpt.meta
        load_state_into(self.vmt, ckpt.model_state, f"checkpoint {self.checkpoint_dir}")
        if ckpt.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
            except (ValueError, KeyError, RuntimeError) as err:
                raise ValueError(f"checkpoint {self.checkpoint_dir}: its optimizer state does not fit "
                                 f"this model ({str(err).splitlines()[0]}); pass --restart") from err
            for p in (p for g in self.optimizer.param_groups for p in g["params"]):
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"checkpoint {self.checkpoint_dir}: its optimizer state does not fit this "
                                         f"model ({key} {tuple(value.shape)} for a parameter {tuple(p.shape)}); "
                                         "pass --restart")
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.learning_rate  # the run's (accepted) value, not the stored one
        if "rng.torch" not in ckpt.tensors or "rng.sampler" not in ckpt.tensors:
            raise ValueError(f"checkpoint {self.checkpoint_dir} was not written by training (no random-number "
                             "states); it cannot be resumed, pass --restart")
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        self.generator.set_state(ckpt.tensors["rng.sampler"])
        device = self._device()
        if device.type == "cuda" and "rng.cuda" in ckpt.tensors:
            torch.cuda.set_rng_state(ckpt.tensors["rng.cuda"], device)
        if self.cursor is not None:
            carried = {int(k.split(".", 1)[1]): v.to(self._device())
                       for k, v in ckpt.tensors.items() if k.startswith("carried.")}
            self.cursor = StreamCursor(self.cursor.streams, int(meta.get("window_index", 0)), carried)
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        return True

    # -- one step -------------------------------------------------------------------------
    def _device(self) -> torch.device:
        """Where the model's parameters live (batches are built on the CPU and moved there)."""
        return next(self.vmt.parameters()).device

    def _skip(self) -> int | None:
        if self.config.max_skip < 2:
            return None
        return int(torch.randint(2, self.config.max_skip + 1, (1,), generator=self.generator))

    def loss(self, annealing: float):
        with sharing_scores(self.vmt):  # the ELBO and the distillation share the token scores
            return self._loss(annealing)

    def _loss(self, annealing: float) -> tuple[LossResult, object]:
        """The step's batch and its :func:`vmt.inference.objective.svi_loss` (this batch
        alone), and the window it read (windows regime; else ``None``)."""
        c = self.config
        if self.reseed_every_step:
            reseed(self.generator, c.seed, self.step, 0)
        teacher = None
        if c.regime == "subsequence":
            base = self.sampler.sample(c.batch_size, self.curriculum.length_at(self.step))
            batch = suffix_parallel_batch(base, c.budget, min(c.min_length, int(base.end.max()))) if c.suffix_parallel else base
            window = None
        else:
            window = self.cursor.next_window()
            batch = attach_carried(window, self.cursor.carried, self.vmt.config.state_dim)
            if c.distill_weight > 0:
                teacher = self.teacher.window(window.documents, window.offsets, batch.num_steps)
        batch = batch_to(batch, self._device())
        skip = self._skip() if c.aux_weight > 0 else None  # after the batch, same generator
        return svi_loss(self.vmt, batch, c, annealing, skip, teacher=teacher), window

    # -- one step and the loop --------------------------------------------------------------
    def train_step(self, annealing: float) -> dict:
        """One optimiser step; returns ``tokens``, ``elbo_per_token``, ``loss`` and the split of
        the negative ELBO, ``reconstruction_per_token`` and ``kl_per_token``."""
        try:
            result, window = self.loss(annealing)
        except ValueError as err:
            if "to satisfy the constraint" not in str(err):
                raise
            # torch.distributions' validation: the network produced invalid (non-finite or
            # out-of-range) distribution parameters, i.e. the model diverged
            raise NonFiniteLoss(f"invalid distribution parameters at step {self.step + 1} "
                                f"({str(err).splitlines()[0][:120]})") from err
        optimiser_step(self.vmt, self.optimizer, result.loss, self.config, self.step)
        if window is not None:
            self.cursor.carry(window, result.terms.x)
        self.step += 1
        recon, kl = result.split_per_token()
        return {"tokens": result.tokens, "elbo_per_token": result.elbo_per_token,
                "loss": float(result.loss.detach()), "reconstruction_per_token": recon, "kl_per_token": kl}

    def fit(self, progress: bool = True) -> TrainResult:
        """Train to ``config.steps`` (:func:`run_steps`)."""
        return run_steps(self, progress)


class _HardInterrupt(KeyboardInterrupt):
    pass


def _lock_path(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.with_name(f".{checkpoint_dir.name}.lock")


class _Signals:
    """SIGINT (Ctrl-C) and SIGTERM (main thread only): the first is recorded and the loop stops
    after the step under way (so the saved state is a whole step); a second one interrupts at
    once (:class:`_HardInterrupt`, nothing more is saved)."""

    def __init__(self):
        self.received = None
        self.holding = False
        self._old = {}

    def install(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None or self.holding:
            self.received = self.received or signal.Signals(signum).name
            return
        raise _HardInterrupt(signal.Signals(signum).name)

    def hold(self) -> None:
        """Only record further signals (while the run saves)."""
        self.holding = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def run_steps(trainer, progress: bool = True) -> TrainResult:
    """The loop every trainer shares: ``trainer.train_step`` to ``config.steps``.

    Logs every ``log_every`` steps into ``trainer.history``, checkpoints every
    ``checkpoint_every`` steps and at the end (``trainer.save()``, which a distributed trainer
    calls on every rank), saves on Ctrl-C, and on a non-finite loss or gradient stops and
    keeps the last good checkpoint. The checkpoint folder is locked meanwhile (see
    :class:`vmt.checkpoint.RunLock`); SIGTERM is handled like Ctrl-C.
    """
    ck = trainer.checkpoint_dir
    lock = RunLock(_lock_path(ck)) if ck is not None and getattr(trainer, "rank", 0) == 0 else None
    if lock is None:
        return _run_steps(trainer, progress)
    with lock:
        return _run_steps(trainer, progress)


def _kept(ck: Path | None, last_good: Path | None, last_step: int | None) -> str:
    if ck is None:
        return "nothing was saved (no checkpoint folder)"
    if last_good is None:
        return f"no checkpoint was written (the run stopped before its first checkpoint); {ck} is untouched"
    return f"kept: the checkpoint of step {last_step} in {ck}"


def _run_steps(trainer, progress: bool) -> TrainResult:
    c = trainer.config
    ck = trainer.checkpoint_dir
    last_good = ck if ck is not None and find_checkpoint(ck) is not None else None
    last_step = None
    if last_good is not None:
        try:
            last_step = int(read_meta(ck).get("step", -1))
        except (ValueError, FileNotFoundError):
            last_step = None
    bar = tqdm(total=c.steps, initial=trainer.step, disable=not progress, desc="SVI", unit="step")
    tokens_seen, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    trainer.vmt.train()
    signals = _Signals().install()
    try:
        while trainer.step < c.steps:
            annealing = c.annealing(trainer.step)
            out = trainer.train_step(annealing)
            tokens_seen += out["tokens"]
            if trainer.step % c.log_every == 0 or trainer.step == c.steps:
                record = {
                    "step": trainer.step, "loss": out["loss"],
                    "elbo_per_token": out["elbo_per_token"],
                    "tokens_per_second": tokens_seen / max(time.perf_counter() - t0, 1e-9),
                    "annealing": annealing,
                    "seconds": time.perf_counter() - t0,
                    "cpu_seconds": time.process_time() - cpu0,
                }
                split = {k: out[k] for k in ("reconstruction_per_token", "kl_per_token") if k in out}
                record.update(split)
                trainer.history.append(record)
                shown = {"elbo_tok": f"{record['elbo_per_token']:.3f}"}
                if split:
                    shown.update(rec=f"{split['reconstruction_per_token']:.3f}",
                                 kl=f"{split['kl_per_token']:.3f}")
                bar.set_postfix(**shown, tok_s=f"{record['tokens_per_second']:.0f}")
                logger.debug("step %d: %s", trainer.step,
                             ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
            bar.update(1)
            if ck is not None and trainer.step % c.checkpoint_every == 0:
                last_good, last_step = trainer.save(), trainer.step
            if signals.received:
                raise KeyboardInterrupt(signals.received)
    except KeyboardInterrupt as err:
        bar.close()
        signals.hold()
        # a second signal stopped a step half-way: keep the last checkpoint, write nothing
        saved = trainer.save() if ck is not None and not isinstance(err, _HardInterrupt) else last_good
        received = signals.received or "SIGINT"
        logger.warning("interrupted (%s) at step %d; %s", received, trainer.step,
                       f"checkpoint saved to {saved}" if saved else "no checkpoint folder, nothing saved")
        return TrainResult(trainer.step, trainer.history, "interrupted", saved, received)
    except NonFiniteLoss as err:
        bar.close()
        kept = _kept(ck, last_good, last_step)
        logger.error("%s; %s", err, kept)
        return TrainResult(trainer.step, trainer.history, f"{err}; {kept}", last_good)
    else:
        bar.close()
        signals.hold()
        saved = trainer.save() if ck is not None else None
        if signals.received:  # a signal during the final save: the run is complete but stops
            return TrainResult(trainer.step, trainer.history, "interrupted", saved, signals.received)
        last = trainer.history[-1] if trainer.history else {}
        if "kl_per_token" in last:
            logger.info("step %d: training -ELBO %.4f = reconstruction %.4f + KL %.4f nats/token",
                        last["step"], -last["elbo_per_token"], last["reconstruction_per_token"],
                        last["kl_per_token"])
        return TrainResult(trainer.step, trainer.history, "completed", saved)
    finally:
        signals.restore()
        trainer.vmt.eval()  # a trained model samples and scores without dropout


def fit(vmt, documents, config: TrainConfig, features: FeatureLookup | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
        meta: dict | None = None, accept_schedule: bool = False,
        teacher: TeacherTargets | None = None) -> TrainResult:
    """Train ``vmt`` by SVI (see :class:`Trainer`); resumes from ``checkpoint_dir`` if asked."""
    trainer = Trainer(vmt, documents, config, features, checkpoint_dir, meta, teacher)
    if resume:
        trainer.resume(accept_schedule)
    return trainer.fit(progress)
