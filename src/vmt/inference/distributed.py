"""Distributed SVI with ``torch.distributed`` (DDP), launched by ``torchrun``.

There is one trainer, :class:`vmt.inference.train.Trainer`; :class:`DistributedTrainer` is that
trainer on one rank of a process group. It adds only what a group needs: DDP around the loss
(:class:`vmt.inference.objective.SVILoss`), which all-reduces the gradients (gloo on CPU, NCCL
on GPUs), one all-reduce of three counts and one of the step's sums, and the collectives of a
checkpoint. Batches, per-step seeds, loss, optimiser step, loop and checkpoints are the
trainer's. Without a process group (a plain ``python`` run) it is the single-process trainer
with its default device on the GPU when there is one. Rank 0 logs and writes checkpoints.
Both regimes are supported:

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

Normalisation. DDP *averages* gradients over the ``W`` ranks, so rank ``r`` computes
``W * (-sum_r(ELBO) / T + w * aux_sum_r / A)`` where ``T`` and ``A`` are the token and
auxiliary-term counts summed over all ranks (:mod:`vmt.inference.objective`). The averaged
gradient is then exactly the gradient of the single-process loss over the union of the ranks'
batches (or windows), whatever the ranks' batch sizes.

Randomness. The sampler generator (batches, skip lengths) and the global RNG of every device
(the guide's noise) of rank ``r`` at step ``s`` are seeded from ``(seed, s, r)``, as in one
process (rank 0 of 1): no random state needs saving, and a run killed and resumed with the same
number of ranks repeats the uninterrupted one exactly.

Checkpoints and resume (:meth:`vmt.inference.train.Trainer.resume`). Model, optimiser and step
are rank-independent, so a checkpoint can be resumed with any number of ranks. In the windows
regime the checkpoint also holds every rank's window index and the carried states of its
continuing documents (gathered to rank 0 when the checkpoint is written). Resumed with the same
number of ranks, every rank continues its streams exactly where they stopped; with a different
number of ranks the document shares change, so every rank restarts its streams at the first
window of an epoch with no carried state (the model and optimiser continue).

Precision. The probabilistic parts run with autocast disabled (their dtype is the model's,
float32 by default); bf16 autocast is for the encoder only
(:func:`vmt.encoders.features.encoder_autocast`, re-exported here).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vmt.encoders.features import encoder_autocast as encoder_autocast
from vmt.inference.objective import SVILoss, aux_counts, step_seed
from vmt.inference.train import TrainConfig, Trainer, TrainResult
from vmt.inference.windows import batch_to

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


class DistributedTrainer(Trainer):
    """The trainer (:class:`vmt.inference.train.Trainer`) on one rank of a ``torchrun`` job, or
    alone: it joins the process group if one is initialised (DDP around the loss, collectives
    through ``torch.distributed``), else it is the single-process trainer.

    ``config.batch_size`` and ``config.budget`` are per rank: the global batch is
    ``world_size`` times larger (module docstring).

    Args:
        vmt: the model; moved to ``device``.
        data: documents (``Sequence`` of ``(time,)`` tensors) or a
            :class:`vmt.data.memmap.MemmapCorpus`.
        config: :class:`TrainConfig`, ``regime="subsequence"`` or ``"windows"``.
        features: lookup of cached features per document (frozen encoder), or ``None`` for a
            VMT with a trainable reader.
        checkpoint_dir: where rank 0 writes checkpoints (``None``: none).
        device: where the model and batches live (default: the current CUDA device when CUDA
            is available, else the CPU; see :func:`init_distributed`).
        meta: extra JSON stored in checkpoints.
        find_unused_parameters: passed to DDP (needed when some parameters get no gradient);
            default: only for a VMT with reverse parts (one direction trains at a time).
        emphasis_cue: token ids before the positions ``config.emphasis`` weights (see
            :class:`~vmt.inference.train.TrainConfig`).
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
        emphasis_cue=(),
    ) -> None:
        if device is None:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"
        if find_unused_parameters is None:
            find_unused_parameters = bool(getattr(vmt.config, "reverse", False))
        self.find_unused_parameters = find_unused_parameters
        super().__init__(vmt, data, config, features, checkpoint_dir, meta, device=device,
                         emphasis_cue=emphasis_cue)

    # -- the process group ------------------------------------------------------------------
    def _join(self) -> tuple[int, int]:
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _wrap(self, loss: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            return loss
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            loss, device_ids=ids, find_unused_parameters=self.find_unused_parameters)

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def _all_gather(self, value) -> list:
        if not dist.is_initialized():
            return [value]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, value)
        return everyone

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


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
    emphasis_cue=(),
) -> TrainResult:
    """:func:`vmt.inference.train.fit` for ``torchrun``: joins the process group the
    environment describes (gloo on CPU, NCCL on GPUs), trains with :class:`DistributedTrainer`
    and resumes from ``checkpoint_dir`` if it holds a checkpoint (see the module docstring for
    what a resume with another number of ranks keeps; the per-rank ``batch_size``, ``window``
    and ``overlap`` may change, and the streams then restart). Run alone (no process group), it is the
    single-process trainer. Both regimes (``config.regime``) are supported."""
    _, _, default_device = init_distributed()
    trainer = DistributedTrainer(
        vmt, data, config, features, checkpoint_dir, device or default_device, meta, emphasis_cue=emphasis_cue
    )
    if resume:
        trainer.resume(accept_layout=True)
    return trainer.fit(progress)

