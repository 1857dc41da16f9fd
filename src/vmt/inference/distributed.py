"""Distributed SVI with ``torch.distributed`` (DDP), launched by ``torchrun``.

Every rank computes its share of the loss on its own data, and
:class:`torch.nn.parallel.DistributedDataParallel` all-reduces the gradients (gloo on CPU,
NCCL on GPUs). Rank 0 logs and writes checkpoints. Both regimes of
:class:`vmt.inference.train.Trainer` are supported:

* ``regime="subsequence"``: every rank samples its own subsequences (from a list of documents
  or straight from a :class:`vmt.data.memmap.MemmapCorpus`).
* ``regime="windows"``: rank ``r`` of ``W`` owns documents ``r, r + W, r + 2W, ...``
  (:func:`vmt.inference.windows.shard_order`) and walks them with its own
  :class:`vmt.inference.windows.DocumentStreams` (``batch_size`` streams) and its own carried
  states. A document never changes rank, so no state crosses ranks: what is exchanged at each
  step is the gradients and three counts, nothing else. Each rank follows the single-process
  epoch semantics on its share: when its streams run out it starts a new epoch from its first
  window with no carried state, independently of the other ranks (shares of unequal total
  length run out at different steps; every rank still takes one window per step, so the
  collectives stay in lockstep).

Normalisation. The single-process loss of :class:`vmt.inference.train.Trainer` over a batch is
``-sum(ELBO) / tokens + w * (aux sums / aux counts)`` (in the subsequence regime
``-mean(ELBO) / mean(length)`` is the same ``-sum(ELBO) / tokens``). DDP *averages* gradients
over the ``W`` ranks, so rank ``r`` computes ``W * (-sum_r(ELBO) / T + w * aux_sum_r / A)``
where ``T`` and ``A`` are the token and auxiliary-term counts summed over all ranks (one small
all-reduce of counts before the forward pass). The averaged gradient is then exactly the
gradient of the single-process loss over the union of the ranks' batches (or windows), whatever
the ranks' batch sizes.

Randomness. The sampler generator (batches, skip lengths) and the global RNG (the guide's
noise) of rank ``r`` at step ``s`` are seeded from ``(seed, s, r)``: no random state needs
saving, and a run killed and resumed with the same number of ranks repeats the uninterrupted
one exactly.

Checkpoints and resume. Model, optimiser and step are rank-independent, so a checkpoint can be
resumed with any number of ranks. In the windows regime the checkpoint also holds every rank's
window index and the carried states of its continuing documents (gathered to rank 0 when the
checkpoint is written). Resumed with the same number of ranks and the same streams
(``batch_size``, ``window``, ``overlap``), every rank continues its streams exactly where they
stopped; with a different number of ranks the document shares change, so every rank restarts
its streams at the first window of an epoch with no carried state (the model and optimiser
continue).

Precision. The probabilistic parts run with autocast disabled (their dtype is the model's,
float32 by default); bf16 autocast is for the encoder only
(:func:`vmt.encoders.features.encoder_autocast`, re-exported here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vmt.checkpoint import (
    check_resume,
    find_checkpoint,
    load_checkpoint,
    load_state_into,
    read_meta,
    read_meta_for,
    save_checkpoint,
)
from vmt.encoders.features import encoder_autocast as encoder_autocast
from vmt.inference.objective import (
    LossResult,
    LossTotals,
    aux_counts,
    optimiser_step,
    reseed,
    step_seed,
    svi_loss,
)
from vmt.inference.subsequences import Curriculum, SubsequenceSampler, suffix_parallel_batch
from vmt.inference.train import TrainConfig, TrainResult, run_steps
from vmt.inference.windows import (
    DocumentStreams,
    StreamCursor,
    Window,
    attach_carried,
    batch_to,
    shard_order,
)
from vmt.models.batch import ChainBatch

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedTrainer",
    "SVILoss",
    "aux_counts",
    "batch_to",
    "distributed_fit",
    "encoder_autocast",
    "init_distributed",
    "step_seed",
]


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (NCCL when CUDA is available, else gloo).

    Returns:
        ``(rank, world_size, device)``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        Without ``WORLD_SIZE`` in the environment (a plain ``python`` run): ``(0, 1, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


class SVILoss(nn.Module):
    """The loss of :meth:`vmt.inference.train.Trainer.loss` as a module, so DDP can wrap it;
    normalised by counts summed over all ranks (module docstring). The same formula serves
    both regimes: with one rank it is the trainer's subsequence loss (``-mean ELBO / mean
    length``) and its windows loss (``-sum ELBO / tokens``) alike.

    Args:
        vmt: the model (a submodule, so its parameters are this module's).
        config: the training settings (``direction``, ``aux_weight``).
    """

    def __init__(self, vmt: nn.Module, config: TrainConfig) -> None:
        super().__init__()
        self.vmt = vmt
        self.config = config

    def forward(
        self,
        batch: ChainBatch,
        annealing: float,
        skip: int | None,
        totals: torch.Tensor,
        world_size: int = 1,
    ) -> LossResult:
        """This rank's share of the loss (:func:`vmt.inference.objective.svi_loss`).

        Args:
            batch: this rank's batch (on the model's device).
            annealing: KL annealing factor.
            skip: the skip length of the auxiliary skip loss (``None``: none).
            totals: ``(3,)`` counts over all ranks: tokens, carried first states, skip pairs.
            world_size: number of ranks whose gradients DDP averages.

        Returns:
            :class:`vmt.inference.objective.LossResult` (``loss`` as in the module docstring,
            ``elbo_sum`` of this rank's rows, ``terms.x`` the sampled path).
        """
        return svi_loss(self.vmt, batch, self.config, annealing, skip, LossTotals.of(totals, world_size))


class DistributedTrainer:
    """SVI on one rank of a ``torchrun`` job (or alone), in either regime.

    ``config.batch_size`` and ``config.budget`` are per rank: the global batch is
    ``world_size`` times larger. In the windows regime ``config.batch_size`` is the number of
    streams of each rank, and rank ``r`` reads only its share of the documents
    (:func:`vmt.inference.windows.shard_order`), see the module docstring.

    Args:
        vmt: the model; moved to ``device``.
        data: documents (``Sequence`` of ``(time,)`` tensors) or a
            :class:`vmt.data.memmap.MemmapCorpus` (sampled or read straight from its memory
            map).
        config: :class:`TrainConfig`, ``regime="subsequence"`` or ``"windows"``.
        features: lookup of cached features per document (frozen encoder), or ``None`` for a
            VMT with a trainable reader.
        checkpoint_dir: where rank 0 writes checkpoints (``None``: none).
        device: where the model and batches live (default: the device of
            :func:`init_distributed`).
        meta: extra JSON stored in checkpoints.
        find_unused_parameters: passed to DDP (needed when some parameters get no gradient);
            default: only for a VMT with reverse parts (one direction trains at a time).
    """

    def __init__(
        self,
        vmt: nn.Module,
        data,
        config: TrainConfig,
        features=None,
        checkpoint_dir: str | Path | None = None,
        device: torch.device | str | None = None,
        meta: dict | None = None,
        find_unused_parameters: bool | None = None,
    ) -> None:
        if config.regime not in ("subsequence", "windows"):
            raise ValueError(f"regime must be 'subsequence' or 'windows', got {config.regime!r}")
        if config.distill_weight > 0:
            raise ValueError("distillation (distill_weight > 0) runs in the single-process trainer only")
        if features is None and vmt.reader is None:
            raise ValueError("give cached features or a VMT with a trainable reader")
        self.rank, self.world_size = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        if device is None:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"
        self.device = torch.device(device)
        self.vmt = vmt.to(self.device)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.meta = dict(meta or {})
        self.generator = torch.Generator()
        self.features = features
        from vmt.data.memmap import MemmapCorpus
        from vmt.inference.subsequences import MemmapSampler

        if isinstance(data, MemmapCorpus):
            self.documents = data.documents
            self.lengths = [int(n) for n in data.length_array]
            self.sampler = MemmapSampler(data, features, self.generator)
        else:
            self.documents = data if isinstance(data, Sequence) else list(data)
            self.lengths = [len(d) for d in self.documents]
            self.sampler = SubsequenceSampler(self.documents, features, self.generator)
        self.cursor: StreamCursor | None = None
        if config.regime == "windows":
            readable = sum(n > 0 for n in self.lengths)
            if readable < self.world_size:
                raise ValueError(
                    f"the windows regime gives every rank its own documents: {readable} "
                    f"non-empty documents cannot feed {self.world_size} ranks"
                )
            self.cursor = StreamCursor(self.streams_for(self.rank, self.world_size))
        self.curriculum = Curriculum(config.min_length, config.max_length, config.steps_per_length)
        self.loss_module = SVILoss(self.vmt, config)
        if find_unused_parameters is None:
            find_unused_parameters = bool(getattr(vmt.config, "reverse", False))
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        else:
            self.model = self.loss_module
        self.params = [p for p in self.vmt.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate)
        self.step = 0
        self.history: list[dict] = []

    def streams_for(self, rank: int, world_size: int) -> DocumentStreams:
        """The document streams rank ``rank`` of ``world_size`` reads in the windows regime
        (its share of the documents, longest first; ``config.batch_size`` streams)."""
        c = self.config
        return DocumentStreams(
            self.documents, c.batch_size, c.window, self.features, c.overlap,
            order=shard_order(self.lengths, rank, world_size), lengths=self.lengths,
        )

    # -- state ----------------------------------------------------------------------------
    def _stream_state(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Every rank's window index and carried states (a collective: all ranks call it)."""
        if self.cursor is None:
            return [], {}
        mine = (self.cursor.window_index, {d: x.cpu() for d, x in self.cursor.carried.items()})
        if self.world_size > 1:
            everyone: list = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        indices = [int(index) for index, _ in everyone]
        tensors = {f"carried.{d}": x for _, carried in everyone for d, x in carried.items()}
        return indices, tensors

    def save(self) -> Path | None:
        """Rank 0 writes a checkpoint; every rank waits for it.

        In the windows regime the checkpoint also holds every rank's window index
        (``window_indices``; ``window_index`` is rank 0's) and the carried states of the
        documents that continue, keyed by document (``carried.<document>``), gathered from all
        ranks: the only time anything but gradients and counts crosses ranks.
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
            }
            path = save_checkpoint(
                self.checkpoint_dir, self.vmt, optimizer=self.optimizer, meta=meta, tensors=tensors
            )
        if self.world_size > 1:
            dist.barrier()
        return path if self.rank == 0 else self.checkpoint_dir

    def _same_streams(self, meta: dict) -> bool:
        """Whether a checkpoint's stream positions mean the same windows for this run."""
        written = meta.get("train_config", {})
        same_geometry = all(
            written.get(k) == getattr(self.config, k) for k in ("regime", "batch_size", "window", "overlap")
        )
        indices = meta.get("window_indices", [meta.get("window_index", 0)])
        return (
            same_geometry
            and int(meta.get("world_size", 1)) == self.world_size
            and len(indices) == self.world_size
        )

    def resume(self, accept_schedule: bool = False) -> bool:
        """Continue from ``checkpoint_dir`` (any rank count may have written it).

        A checkpoint of other data or settings is refused as in
        :meth:`vmt.inference.train.Trainer.resume` (the stream layout, ``batch_size``,
        ``window`` and ``overlap``, may change: see below).

        Model, optimiser and step are rank-independent. In the windows regime each rank also
        takes back its window index and carried states when the checkpoint was written by the
        same number of ranks with the same streams (``batch_size``, ``window``, ``overlap``);
        otherwise the document shares differ, and every rank restarts its streams at the first
        window of an epoch with no carried state (training continues from the saved model and
        optimiser).
        """
        if self.checkpoint_dir is None or find_checkpoint(self.checkpoint_dir) is None:
            return False
        layout = ("batch_size", "window", "overlap")
        stored = read_meta(self.checkpoint_dir)
        stored_config = {k: v for k, v in dict(stored.get("train_config", {})).items() if k not in layout}
        now_config = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in layout}
        check_resume(self.checkpoint_dir, {**stored, "train_config": stored_config},
                     {**self.meta, "train_config": now_config}, accept_schedule)
        meta = read_meta_for(self.checkpoint_dir, self.vmt.config)
        # the tensors as stored (rebuilding the model would cast them to float32)
        ckpt = load_checkpoint(self.checkpoint_dir, build_model=False)
        state = {k: v.to(self.device) for k, v in ckpt.model_state.items()}
        load_state_into(self.vmt, state, f"checkpoint {self.checkpoint_dir}")
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.learning_rate  # the run's (accepted) value
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
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
                logger.info("rank %d restarts its document streams (the checkpoint's streams "
                            "were laid out for another rank count or window)", self.rank)
        logger.info(
            "rank %d resumed from %s at step %d (written by %s ranks, now %d)",
            self.rank, self.checkpoint_dir, self.step, meta.get("world_size", 1), self.world_size,
        )
        return True

    # -- one step -------------------------------------------------------------------------
    def _reseed(self, step: int, rank: int) -> None:
        reseed(self.generator, self.config.seed, step, rank)

    def _draw_skip(self) -> int | None:
        if self.config.max_skip < 2:
            return None
        return int(torch.randint(2, self.config.max_skip + 1, (1,), generator=self.generator))

    def sample_batch(self, step: int, rank: int | None = None) -> tuple[ChainBatch, int | None]:
        """This rank's batch and skip length of ``step`` (subsequence regime); reseeds the
        generator and the global RNG from :func:`step_seed` (so the guide's noise of the step
        follows too)."""
        c = self.config
        rank = self.rank if rank is None else rank
        self._reseed(step, rank)
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
        rank = self.rank if rank is None else rank
        self._reseed(step, rank)
        window = cursor.next_window()
        batch = attach_carried(window, cursor.carried, self.vmt.config.state_dim)
        return batch_to(batch, self.device), self._draw_skip(), window

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def _global_sums(self, result: LossResult, out: list) -> float:
        """All-reduce this rank's loss and ELBO sum (appended to ``out``); their sum, which
        every rank checks alike (a non-finite value on any rank stops all of them)."""
        stats = self._all_reduce(torch.stack([result.loss.detach().double().cpu(), result.elbo_sum.double().cpu()]))
        out.append(stats)
        return float(stats.sum())

    def train_step(self, annealing: float) -> dict:
        """One optimiser step; returns global ``tokens``, ``elbo_per_token``, ``elbo_sum`` and
        ``loss``."""
        c = self.config
        window = None
        if self.cursor is not None:
            batch, skip, window = self.window_batch(self.step)
        else:
            batch, skip = self.sample_batch(self.step)
        init, pairs = aux_counts(batch, skip)
        counts = torch.tensor([int(batch.mask().sum()), init, pairs], dtype=torch.int64)
        totals = self._all_reduce(counts)
        result = self.model(batch, annealing, skip, totals, self.world_size)
        sums: list[torch.Tensor] = []
        optimiser_step(self.vmt, self.optimizer, result.loss, c, self.step,
                       lambda: self._global_sums(result, sums))
        stats = sums[0]
        if window is not None:
            self.cursor.carry(window, result.terms.x.detach())
        self.step += 1
        tokens = int(totals[0])
        # the per-rank losses sum to W times the global loss (DDP averages their gradients)
        return {"tokens": tokens, "elbo_sum": float(stats[1]),
                "elbo_per_token": float(stats[1]) / max(tokens, 1),
                "loss": float(stats[0]) / self.world_size}

    # -- the loop -------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> TrainResult:
        """Train to ``config.steps`` (:func:`vmt.inference.train.run_steps`); rank 0 logs and
        shows progress, checkpoints are written every ``checkpoint_every`` steps and at the
        end."""
        return run_steps(self, progress and self.rank == 0)


def distributed_fit(
    vmt: nn.Module,
    data,
    config: TrainConfig,
    features=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    meta: dict | None = None,
) -> TrainResult:
    """:func:`vmt.inference.train.fit` for ``torchrun``: joins the process group the
    environment describes (gloo on CPU, NCCL on GPUs), trains with :class:`DistributedTrainer`
    and resumes from ``checkpoint_dir`` if it holds a checkpoint (see the module docstring for
    what a resume with another number of ranks keeps). Run alone, it trains on one process with
    the same semantics. Both regimes (``config.regime``) are supported."""
    _, _, default_device = init_distributed()
    trainer = DistributedTrainer(
        vmt, data, config, features, checkpoint_dir, device or default_device, meta
    )
    if resume:
        trainer.resume()
    return trainer.fit(progress)

