"""The one SVI trainer, for both regimes and both launch modes, returning typed results.

:class:`Trainer` runs one process; :class:`vmt.inference.distributed.DistributedTrainer` is the
same trainer on one rank of a ``torchrun`` job (it adds the process group: DDP's gradient
all-reduce and the few collectives of a checkpoint). A single process is the world-size-1 case
of a distributed run: the same batches, per-step seeds, loss, step, loop and checkpoints.

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
end, and on Ctrl-C or SIGTERM, after which the run stops), resume (the same run continues:
model, optimiser, step, stream positions and carried states are restored; a checkpoint written
for other data, vocabulary or settings is refused, see :func:`vmt.checkpoint.check_resume`), a
lock on the checkpoint folder (one run at a time), and a non-finite loss, gradient or
parameter stops the run with a diagnostic naming what was kept (never a non-finite weight).

Randomness. Before every step the sampler's generator (batches, skip lengths) and the global
RNG of every device (the guide's noise, dropout; CPU and every CUDA device) of rank ``r`` are
seeded from ``(config.seed, step, r)`` (:func:`vmt.inference.objective.reseed`): the random
numbers of a step depend on nothing else, so no random state is saved, and a resumed run
repeats the uninterrupted one exactly (with the same number of ranks).
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
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from vmt.checkpoint import (
    RunLock,
    check_checkpoint_path,
    check_resume,
    find_checkpoint,
    load_checkpoint,
    load_state_into,
    read_meta,
    read_meta_for,
    save_checkpoint,
)
from vmt.config_fields import config_from_dict
from vmt.encoders.teacher import TeacherTargets
from vmt.inference.objective import (
    LossResult,
    NonFiniteLoss,
    SVILoss,
    batch_counts,
    make_optimizer,
    optimiser_step,
    reseed,
)
from vmt.inference.subsequences import (
    Curriculum,
    FeatureLookup,
    MemmapSampler,
    SubsequenceSampler,
    suffix_parallel_batch,
)
from vmt.inference.windows import (
    DocumentStreams,
    StreamCursor,
    Window,
    attach_carried,
    batch_to,
    shard_order,
)
from vmt.models.batch import ChainBatch
from vmt.models.parts import NextTokenEmission
from vmt.models.tokens import sharing_scores

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one SVI run (saved in its checkpoints).

    ``lr_decay_steps`` / ``lr_final_fraction``: see :meth:`learning_rate_at`; the rate is a
    function of the step alone, so a resumed run continues the same schedule.
    ``weight_decay > 0`` trains with AdamW (the decay decoupled from the gradient and scaled by
    the step's learning rate) instead of Adam: a regulariser against overfitting small data.
    ``ragged_windows`` (windows regime): windows as long as the longest remaining document, up
    to ``window``, rows whose document ends inside padded, instead of every window shrinking to
    the nearest document end (see :class:`~vmt.inference.windows.DocumentStreams`).
    ``max_cpu_seconds > 0`` is a training CPU budget: the run stops (``stopped="cpu budget"``,
    a checkpoint written) after the first step at which the process CPU time spent in SVI steps
    (``time.process_time`` around each step, summed over the run and its resumes; the mean over
    the ranks of a distributed run) reaches it, or at ``steps``, whichever comes first; 0 (the
    default) means no budget. Like ``steps`` it may change on resume.
    ``emphasis != 1`` (windows regime): the ELBO term of every position right after an
    occurrence of the trainer's ``emphasis_cue`` (token ids, e.g. an answer's prompt) is
    weighted by ``emphasis`` in the loss, so that rare positions which only a carried memory can
    predict (the answer to a question about something read long before) count for more in the
    gradient. The loss is then a training objective, not a bound; the logged ELBO and every
    evaluation stay unweighted.
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
    ragged_windows: bool = False
    aux_weight: float = 0.1
    max_skip: int = 8
    annealing_start: float = 1.0
    annealing_steps: int = 0
    lr_decay_steps: int = 0
    lr_final_fraction: float = 0.1
    distill_weight: float = 0.0
    weight_decay: float = 0.0
    max_cpu_seconds: float = 0.0
    emphasis: float = 1.0
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
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.max_cpu_seconds >= 0:
            raise ValueError(f"max_cpu_seconds must be >= 0 (0: no CPU budget), got {self.max_cpu_seconds}")
        if self.distill_weight > 0 and self.regime != "windows":
            raise ValueError("distillation (distill_weight > 0) needs regime 'windows'")
        if not self.emphasis > 0:
            raise ValueError(f"emphasis must be > 0, got {self.emphasis}")
        if self.emphasis != 1 and self.regime != "windows":
            raise ValueError(f"emphasis {self.emphasis} (weighted positions) needs regime 'windows'")
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
        stopped: ``"completed"`` (``steps`` done), ``"cpu budget"`` (``max_cpu_seconds``
            spent first), ``"interrupted"`` or a diagnostic of what went wrong.
        checkpoint: the last good checkpoint, if any was written.
        cpu_seconds: process CPU time spent in SVI steps, summed over the run and the runs it
            resumed (what ``max_cpu_seconds`` limits).
    """

    steps: int
    history: list[dict] = field(default_factory=list)
    stopped: str = "completed"
    checkpoint: Path | None = None
    signal: str | None = None  # "SIGINT" or "SIGTERM" when interrupted
    cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.stopped in ("completed", "cpu budget", "interrupted")


class Trainer:
    """Runs SVI on a VMT: the one trainer of both launch modes, here in one process.

    One process is the world-size-1 case of a distributed run: rank 0 of 1 samples the same
    batches (or reads the same windows), seeds every step from ``(config.seed, step, 0)``,
    computes the same loss (:class:`vmt.inference.objective.SVILoss`, normalised by the counts
    of its own batch), takes the same step (:func:`vmt.inference.objective.optimiser_step`) and
    writes the same checkpoints as :class:`vmt.inference.distributed.DistributedTrainer` alone.
    That subclass only joins the process group: it wraps the loss in DDP (which all-reduces the
    gradients) and implements the collectives (:meth:`_all_reduce`, :meth:`_all_gather`,
    :meth:`_barrier`), which are the identity here.

    ``config.batch_size`` and ``config.budget`` are per rank. In the windows regime
    ``config.batch_size`` is the number of streams of each rank, and rank ``r`` of ``W`` reads
    only its share of the documents (:func:`vmt.inference.windows.shard_order`; one process
    reads them all, longest first).

    Args:
        vmt: the model (its reader, if any, trains with it).
        documents: training documents, ``(time,)`` tokens or ``(time, obs)`` arrays, or a
            :class:`vmt.data.memmap.MemmapCorpus` (sampled or read straight from its memory
            map).
        config: :class:`TrainConfig`.
        features: lookup of cached guide features per document (frozen encoder), or
            ``None`` when the VMT has a trainable reader.
        checkpoint_dir: where checkpoints go (``None``: none are written; rank 0 writes them).
        meta: extra JSON stored in checkpoints (and compared on resume).
        teacher: a pretrained LM's next-token distributions per document
            (:class:`~vmt.encoders.teacher.TeacherTargets`), needed when
            ``config.distill_weight > 0``: the loss then adds ``distill_weight`` times the
            cross-entropy of the VMT's next-token predictive against them (teacher-forced; one
            process only).
        device: where the model and batches live; the model is moved there (default: where
            its parameters are).
        emphasis_cue: token ids whose next position gets weight ``config.emphasis`` (needed
            when it is not 1; ignored when it is).
    """

    def __init__(
        self,
        vmt,
        documents,
        config: TrainConfig,
        features: FeatureLookup | None = None,
        checkpoint_dir: str | Path | None = None,
        meta: dict | None = None,
        teacher: TeacherTargets | None = None,
        *,
        device: torch.device | str | None = None,
        emphasis_cue: Sequence[int] = (),
    ):
        if features is None and vmt.reader is None:
            raise ValueError("give cached features or a VMT with a trainable reader")
        if config.emphasis != 1 and not len(emphasis_cue):
            raise ValueError(f"emphasis {config.emphasis} needs an emphasis_cue (the token ids before "
                             "the positions to weight)")
        self.emphasis_cue = tuple(int(t) for t in emphasis_cue)
        self.rank, self.world_size = self._join()
        from vmt.data.memmap import MemmapCorpus

        if isinstance(documents, MemmapCorpus):
            self.documents = documents.documents
            self.lengths = [int(n) for n in documents.length_array]
        else:
            self.documents = documents if isinstance(documents, Sequence) else list(documents)
            self.lengths = [len(d) for d in self.documents]
        if config.distill_weight > 0:
            if teacher is None:
                raise ValueError("distill_weight > 0 needs teacher targets")
            if self.world_size > 1:
                raise ValueError(f"distillation (distill_weight > 0) runs in one process, "
                                 f"not {self.world_size} ranks")
            if not isinstance(vmt.emission, NextTokenEmission):
                raise ValueError(
                    f"distillation needs an emission with a next-token predictive (the token "
                    f"family), got emission {vmt.config.emission!r}")
            if len(teacher) != len(self.lengths):
                raise ValueError(f"teacher targets cover {len(teacher)} documents, training has {len(self.lengths)}")
        self.teacher = teacher
        self.device = torch.device(device) if device is not None else next(vmt.parameters()).device
        self.vmt = vmt.to(self.device)
        self.config = config
        self.features = features
        self.checkpoint_dir = check_checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
        self.meta = dict(meta or {})
        self.generator = torch.Generator()  # seeded before every step (:func:`reseed`)
        if isinstance(documents, MemmapCorpus):
            self.sampler = MemmapSampler(documents, features, self.generator)
        else:
            self.sampler = SubsequenceSampler(self.documents, features, self.generator)
        self.curriculum = Curriculum(config.min_length, config.max_length, config.steps_per_length)
        # the windows regime's place in this rank's document streams and its carried states
        self.cursor: StreamCursor | None = None
        if config.regime == "windows":
            readable = sum(n > 0 for n in self.lengths)
            if readable < self.world_size:
                raise ValueError(
                    f"the windows regime gives every rank its own documents: {readable} "
                    f"non-empty documents cannot feed {self.world_size} ranks")
            self.cursor = StreamCursor(self.streams_for(self.rank, self.world_size))
        self.loss_module = SVILoss(self.vmt, config)
        self.model = self._wrap(self.loss_module)
        self.params = [p for p in self.vmt.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config)
        self.step = 0
        self.history: list[dict] = []
        self.cpu_seconds = 0.0  # process CPU time in SVI steps, this run and the ones it resumed

    @property
    def config(self) -> TrainConfig:
        return self._config

    @config.setter
    def config(self, value: TrainConfig) -> None:
        """A new config (e.g. more ``steps``) reaches the loss as well."""
        self._config = value
        if hasattr(self, "loss_module"):
            self.loss_module.config = value

    # -- the process group: one process here (DistributedTrainer overrides these) -----------
    def _join(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process."""
        return 0, 1

    def _wrap(self, loss: torch.nn.Module) -> torch.nn.Module:
        """The module the step calls (DDP around the loss on a process group)."""
        return loss

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks, on the CPU."""
        return values.cpu()

    def _all_gather(self, value) -> list:
        """Every rank's ``value`` (a picklable object), in rank order."""
        return [value]

    def _barrier(self) -> None:
        """Wait for every rank."""

    def streams_for(self, rank: int, world_size: int) -> DocumentStreams:
        """The document streams rank ``rank`` of ``world_size`` reads in the windows regime
        (its share of the documents, longest first; ``config.batch_size`` streams)."""
        c = self.config
        return DocumentStreams(
            self.documents, c.batch_size, c.window, self.features, c.overlap,
            order=shard_order(self.lengths, rank, world_size), lengths=self.lengths,
            ragged=c.ragged_windows,
            emphasis=(self.emphasis_cue, c.emphasis) if c.emphasis != 1 else None,
        )

    # -- state ----------------------------------------------------------------------------
    def _stream_state(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Every rank's window index and carried states (a collective: all ranks call it)."""
        if self.cursor is None:
            return [], {}
        mine = (self.cursor.window_index, {d: x.cpu() for d, x in self.cursor.carried.items()})
        everyone = self._all_gather(mine)
        indices = [int(index) for index, _ in everyone]
        tensors = {f"carried.{d}": x for _, carried in everyone for d, x in carried.items()}
        return indices, tensors

    def save(self) -> Path | None:
        """Rank 0 writes a checkpoint (model, optimiser, step, history); every rank waits for it.

        In the windows regime the checkpoint also holds every rank's window index
        (``window_indices``; ``window_index`` is rank 0's) and the carried states of the
        documents that continue, keyed by document (``carried.<document>``), gathered from all
        ranks. No random state is saved: every step is seeded from ``(seed, step, rank)``.
        """
        indices, tensors = self._stream_state()
        path = None
        if self.rank == 0 and self.checkpoint_dir is not None:
            meta = {
                **self.meta,
                "train_config": dataclasses.asdict(self.config),
                "step": self.step,
                "window_index": indices[0] if indices else 0,
                "window_indices": indices,
                "history": self.history,
                "world_size": self.world_size,
                "cpu_seconds": self.cpu_seconds,
            }
            path = save_checkpoint(self.checkpoint_dir, self.vmt, optimizer=self.optimizer, meta=meta,
                                   tensors=tensors)
        self._barrier()
        return path if self.rank == 0 else self.checkpoint_dir

    def _same_streams(self, meta: dict) -> bool:
        """Whether a checkpoint's stream positions mean the same windows for this run."""
        written = meta.get("train_config", {})
        same_layout = all(written.get(k) == getattr(self.config, k)
                          for k in ("regime", "batch_size", "window", "overlap", "ragged_windows"))
        indices = meta.get("window_indices", [meta.get("window_index", 0)])
        return (same_layout and int(meta.get("world_size", 1)) == self.world_size
                and len(indices) == self.world_size)

    def resume(self, accept_schedule: bool = False, accept_layout: bool = False) -> bool:
        """Continue from ``checkpoint_dir`` if it holds a checkpoint; True if it did.

        Refuses (ValueError) a checkpoint of another model config, other data or vocabulary
        (``meta``) or other training settings; changed schedule values (learning rate, clipping,
        annealing) only with ``accept_schedule``, and then they take effect. The per-rank
        layout (``batch_size``, ``window``, ``overlap``) may change with ``accept_layout``
        (:func:`vmt.inference.distributed.distributed_fit` passes it: per-rank sizes are chosen
        with the number of ranks) or when the number of ranks changed; the streams then restart.

        Model, optimiser and step do not depend on the ranks, so any number of ranks may have
        written the checkpoint. In the windows regime each rank also takes back its window index
        and carried states when the checkpoint was written by the same number of ranks with the
        same layout; otherwise the windows differ, and every rank restarts its streams at the first
        window of an epoch with no carried state (training continues from the saved model and
        optimiser). The random-number states of checkpoints written before every step was
        seeded (``rng.*``) are not needed and are ignored.
        """
        if self.checkpoint_dir is None or find_checkpoint(self.checkpoint_dir) is None:
            return False
        # the data, vocabulary and settings first: they say why a model config differs
        stored = read_meta(self.checkpoint_dir)
        # a field added since the checkpoint was written ran with its default then
        defaults = dataclasses.asdict(TrainConfig())
        stored_config = {**defaults, **stored.get("train_config", {})}
        now_config = dataclasses.asdict(self.config)
        if accept_layout or int(stored.get("world_size", 1)) != self.world_size:
            layout = ("batch_size", "window", "overlap", "ragged_windows")
            stored_config = {k: v for k, v in stored_config.items() if k not in layout}
            now_config = {k: v for k, v in now_config.items() if k not in layout}
        changed = check_resume(self.checkpoint_dir, {**stored, "train_config": stored_config},
                               {**self.meta, "train_config": now_config}, accept_schedule)
        meta = read_meta_for(self.checkpoint_dir, self.vmt.config)
        if changed:
            logger.warning("resuming with a changed schedule: %s", "; ".join(changed))
        if "step" not in meta or "train_config" not in meta:
            raise ValueError(f"checkpoint {self.checkpoint_dir} was not written by training (no step or "
                             "train_config); it cannot be resumed, pass --restart")
        # the tensors as stored (rebuilding the model would cast them to float32)
        ckpt = load_checkpoint(self.checkpoint_dir, build_model=False)
        load_state_into(self.vmt, ckpt.model_state, f"checkpoint {self.checkpoint_dir}")
        if ckpt.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
            except (ValueError, KeyError, RuntimeError) as err:
                raise ValueError(f"checkpoint {self.checkpoint_dir}: its optimizer state does not fit "
                                 f"this model ({str(err).splitlines()[0]}); pass --restart") from err
            for p in self.params:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"checkpoint {self.checkpoint_dir}: its optimizer state does not fit this "
                                         f"model ({key} {tuple(value.shape)} for a parameter {tuple(p.shape)}); "
                                         "pass --restart")
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.learning_rate  # the run's (accepted) value, not the stored one
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        self.cpu_seconds = float(meta.get("cpu_seconds", 0.0))  # absent in older checkpoints
        if self.cursor is not None:
            self.cursor.restart()
            if self._same_streams(meta):
                indices = meta.get("window_indices", [meta.get("window_index", 0)])
                share = set(self.cursor.streams.order)
                self.cursor.window_index = int(indices[self.rank])
                self.cursor.carried = {
                    d: v.to(self.device)
                    for k, v in ckpt.tensors.items()
                    if k.startswith("carried.") and (d := int(k.split(".", 1)[1])) in share
                }
            else:
                logger.info("rank %d restarts its document streams (the checkpoint's streams were "
                            "laid out for another rank count or layout)", self.rank)
        logger.info("rank %d resumed from %s at step %d (written by %s ranks, now %d)", self.rank,
                    self.checkpoint_dir, self.step, meta.get("world_size", 1), self.world_size)
        return True

    # -- one step -------------------------------------------------------------------------
    def _reseed(self, step: int, rank: int) -> None:
        reseed(self.generator, self.config.seed, step, rank)

    def _draw_skip(self) -> int | None:
        if self.config.max_skip < 2:
            return None
        return int(torch.randint(2, self.config.max_skip + 1, (1,), generator=self.generator))

    def sample_batch(self, step: int, rank: int | None = None) -> tuple[ChainBatch, int | None]:
        """Rank ``rank``'s (default: this rank's) batch and skip length of ``step`` (subsequence
        regime), on the model's device; reseeds the generator and the global RNG from
        :func:`vmt.inference.objective.step_seed` first (so the guide's noise of the step
        follows too)."""
        c = self.config
        self._reseed(step, self.rank if rank is None else rank)
        base = self.sampler.sample(c.batch_size, self.curriculum.length_at(step))
        if c.suffix_parallel:
            base = suffix_parallel_batch(base, c.budget, min(c.min_length, int(base.end.max())))
        skip = self._draw_skip()
        return batch_to(base, self.device), skip

    def window_batch(
        self, step: int, cursor: StreamCursor | None = None, rank: int | None = None
    ) -> tuple[ChainBatch, int | None, Window]:
        """The next window of ``cursor`` (default: this rank's) as a batch on the model's
        device with the carried states as ``x0``, the skip length, and the window itself
        (windows regime); reseeds like :meth:`sample_batch`."""
        if cursor is None:
            if self.cursor is None:
                raise ValueError("window_batch needs regime='windows' or a cursor")
            cursor = self.cursor
        self._reseed(step, self.rank if rank is None else rank)
        window = cursor.next_window()
        batch = attach_carried(window, cursor.carried, self.vmt.config.state_dim)
        return batch_to(batch, self.device), self._draw_skip(), window

    def loss(self, annealing: float) -> tuple[LossResult, Window | None, torch.Tensor]:
        """The step's batch and its loss share (:class:`vmt.inference.objective.SVILoss`):
        the :class:`~vmt.inference.objective.LossResult`, the window it read (windows regime;
        else ``None``) and the ``(3,)`` counts summed over the ranks (tokens first)."""
        with sharing_scores(self.vmt):  # the ELBO and the distillation share the token scores
            c = self.config
            window = None
            if self.cursor is not None:
                batch, skip, window = self.window_batch(self.step)
            else:
                batch, skip = self.sample_batch(self.step)
            teacher = None
            if c.distill_weight > 0 and window is not None:
                teacher = self.teacher.window(window.documents, window.offsets, batch.num_steps)
            totals = self._all_reduce(batch_counts(batch, skip))
            result = self.model(batch, annealing, skip, totals, self.world_size, teacher=teacher)
        return result, window, totals

    def train_step(self, annealing: float) -> dict:
        """One optimiser step; returns (over all ranks) ``tokens``, ``elbo_sum``,
        ``elbo_per_token``, ``loss`` and the split of the negative ELBO,
        ``reconstruction_per_token`` and ``kl_per_token``."""
        try:
            result, window, totals = self.loss(annealing)
        except ValueError as err:
            if "to satisfy the constraint" not in str(err):
                raise
            # torch.distributions' validation: the network produced invalid (non-finite or
            # out-of-range) distribution parameters, i.e. the model diverged
            raise NonFiniteLoss(f"invalid distribution parameters at step {self.step + 1} "
                                f"({str(err).splitlines()[0][:120]})") from err
        local = torch.cat([torch.stack([result.loss.detach(), result.elbo_sum]), result.split_sums()])
        sums: list[torch.Tensor] = []

        def global_loss() -> float:
            # after backward: every rank checks the same sum, so a non-finite loss on any
            # rank stops all of them
            sums.append(self._all_reduce(local.double().cpu()))
            return float(sums[0][0])

        optimiser_step(self.vmt, self.optimizer, result.loss, self.config, self.step, global_loss)
        if window is not None:
            self.cursor.carry(window, result.terms.x)
        self.step += 1
        loss, elbo, recon, kl = (float(v) for v in sums[0])
        tokens = int(totals[0])
        per = max(tokens, 1)
        # the ranks' losses sum to W times the loss (DDP averages their gradients)
        return {"tokens": tokens, "elbo_sum": elbo, "elbo_per_token": elbo / per,
                "loss": loss / self.world_size, "reconstruction_per_token": recon / per,
                "kl_per_token": kl / per}

    def timed_step(self, annealing: float) -> dict:
        """:meth:`train_step`, adding its process CPU time to :attr:`cpu_seconds` (with a CPU
        budget, the mean over the ranks, so that every rank stops at the same step)."""
        start = _cpu_now()
        out = self.train_step(annealing)
        spent = _cpu_now() - start
        if self.config.max_cpu_seconds > 0 and self.world_size > 1:
            spent = float(self._all_reduce(torch.tensor([spent], dtype=torch.float64))[0]) / self.world_size
        self.cpu_seconds += spent
        return out

    def budget_spent(self) -> bool:
        """Whether the CPU budget (``config.max_cpu_seconds``, if any) is used up."""
        budget = self.config.max_cpu_seconds
        return budget > 0 and self.cpu_seconds >= budget

    def fit(self, progress: bool = True) -> TrainResult:
        """Train to ``config.steps`` or the CPU budget (:func:`run_steps`); rank 0 shows progress."""
        return run_steps(self, progress and self.rank == 0)


def _cpu_now() -> float:
    """This process's CPU time (the clock of ``max_cpu_seconds``)."""
    return time.process_time()


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
    """The loop of the trainer (every rank runs it): ``trainer.train_step`` to ``config.steps``,
    or until ``config.max_cpu_seconds`` of SVI steps are spent (``stopped="cpu budget"``).

    Logs every ``log_every`` steps into ``trainer.history``, checkpoints every
    ``checkpoint_every`` steps and at the end (``trainer.save()``, called on every rank), saves
    on Ctrl-C, and on a non-finite loss or gradient stops and
    keeps the last good checkpoint. The checkpoint folder is locked meanwhile (see
    :class:`vmt.checkpoint.RunLock`); SIGTERM is handled like Ctrl-C.
    """
    ck = trainer.checkpoint_dir
    lock = RunLock(_lock_path(ck)) if ck is not None and trainer.rank == 0 else None
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
        while trainer.step < c.steps and not trainer.budget_spent():
            annealing = c.annealing(trainer.step)
            out = trainer.timed_step(annealing)
            tokens_seen += out["tokens"]
            if trainer.step % c.log_every == 0 or trainer.step == c.steps or trainer.budget_spent():
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
        return TrainResult(trainer.step, trainer.history, "interrupted", saved, received, trainer.cpu_seconds)
    except NonFiniteLoss as err:
        bar.close()
        kept = _kept(ck, last_good, last_step)
        logger.error("%s; %s", err, kept)
        return TrainResult(trainer.step, trainer.history, f"{err}; {kept}", last_good,
                           cpu_seconds=trainer.cpu_seconds)
    else:
        bar.close()
        signals.hold()
        saved = trainer.save() if ck is not None else None
        if signals.received:  # a signal during the final save: the run is complete but stops
            return TrainResult(trainer.step, trainer.history, "interrupted", saved, signals.received,
                               trainer.cpu_seconds)
        last = trainer.history[-1] if trainer.history else {}
        if "kl_per_token" in last:
            logger.info("step %d: training -ELBO %.4f = reconstruction %.4f + KL %.4f nats/token",
                        last["step"], -last["elbo_per_token"], last["reconstruction_per_token"],
                        last["kl_per_token"])
        stopped = "completed"
        if trainer.step < c.steps:
            stopped = "cpu budget"
            logger.info("step %d: the CPU budget of %g s is spent (%.1f CPU s in SVI steps)", trainer.step,
                        c.max_cpu_seconds, trainer.cpu_seconds)
        return TrainResult(trainer.step, trainer.history, stopped, saved, cpu_seconds=trainer.cpu_seconds)
    finally:
        signals.restore()
        trainer.vmt.eval()  # a trained model samples and scores without dropout


def fit(vmt: VariationalMarkovTransformer, documents, config: TrainConfig, features: FeatureLookup | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
        meta: dict | None = None, accept_schedule: bool = False,
        teacher: TeacherTargets | None = None, emphasis_cue: Sequence[int] = ()) -> TrainResult:
    """Train ``vmt`` by SVI in this process (see :class:`Trainer`; under ``torchrun`` use
    :func:`vmt.inference.distributed.distributed_fit`); resumes from ``checkpoint_dir`` if
    asked."""
    trainer = Trainer(vmt, documents, config, features, checkpoint_dir, meta, teacher,
                      emphasis_cue=emphasis_cue)
    if resume:
        trainer.resume(accept_schedule)
    return trainer.fit(progress)
