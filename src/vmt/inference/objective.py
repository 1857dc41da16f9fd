"""The loss SVI minimises, written once for every trainer, and one optimiser step.

For a batch of ``batch`` rows and ``time`` steps with ELBO terms (:func:`elbo_terms`):

* alone (one process, :class:`vmt.inference.train.Trainer`): in the subsequence regime
  ``-mean(ELBO_b) / mean(length_b)``, in the windows regime ``-sum(ELBO_b) / tokens`` (the
  same quantity, summed in another order), plus ``distill_weight * CE`` (windows only) and
  ``aux_weight * (L_init + L_prior + L_skip)`` (each a mean over its terms);
* over ``W`` ranks (:class:`vmt.inference.distributed.DistributedTrainer`): rank ``r`` computes
  ``W * (-sum_r(ELBO) / T + w * sum_r(aux) / A)`` with the counts ``T`` (tokens) and ``A``
  (auxiliary terms) summed over the ranks (:class:`LossTotals`); DDP averages the gradients,
  which makes them the gradients of the loss alone over the union of the ranks' batches. With
  one rank it is the loss alone up to the order of the sums.

:func:`optimiser_step` is the step both trainers take after the loss: backward, the
non-finite checks, clipping, the learning rate of the step (:meth:`TrainConfig.learning_rate_at`)
and Adam.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vmt.encoders.teacher import soft_cross_entropy
from vmt.inference.elbo import ElboTerms, auxiliary_losses, elbo_terms
from vmt.models.batch import ChainBatch


class NonFiniteLoss(RuntimeError):
    """The loss, a gradient or a parameter is not finite (the run stops, see ``run_steps``)."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank`` at step ``step`` of a run seeded with ``seed`` (63 bits)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def reseed(generator: torch.Generator, seed: int, step: int, rank: int) -> None:
    """Seed ``generator`` (batches, skip lengths) and the global RNG of every device (the
    guide's noise, dropout; :func:`torch.manual_seed` seeds CPU and all CUDA devices) from
    :func:`step_seed`: the step's randomness depends on ``(seed, step, rank)`` alone."""
    value = step_seed(seed, step, rank)
    generator.manual_seed(value)
    torch.manual_seed(value ^ 0x5DEECE66D)


def aux_counts(batch: ChainBatch, skip: int | None) -> tuple[int, int]:
    """How many terms :func:`vmt.inference.elbo.auxiliary_losses` averages for ``init`` and
    ``skip`` (its ``prior`` averages over the batch's tokens)."""
    init = int((batch.first_mask() & batch.carried_rows()[:, None]).sum())
    pairs = 0
    if skip is not None and skip >= 2 and batch.num_steps > skip:
        pos = batch.positions()
        valid = (pos[:-skip] >= batch.start[:, None]) & (pos[skip:] < batch.end[:, None])
        pairs = int(valid.sum())
    return init, pairs


@dataclass(frozen=True)
class LossTotals:
    """Counts over all ranks that normalise a rank's share of the loss.

    Attributes:
        tokens: observed tokens of all ranks' batches.
        init: carried first states (terms of ``L_init``) of all ranks.
        pairs: skip pairs (terms of ``L_skip``) of all ranks.
        world_size: the number of ranks whose gradients DDP averages.
    """

    tokens: int
    init: int
    pairs: int
    world_size: int = 1

    @classmethod
    def of(cls, counts: torch.Tensor, world_size: int) -> LossTotals:
        """From ``(3,)`` summed counts (tokens, carried first states, skip pairs)."""
        if counts.shape != (3,):
            raise ValueError(f"totals must be (3,), got {tuple(counts.shape)}")
        tokens, init, pairs = (int(v) for v in counts.tolist())
        return cls(tokens, init, pairs, world_size)


@dataclass(frozen=True)
class LossResult:
    """One evaluation of the SVI loss.

    Attributes:
        loss: scalar to differentiate (see the module docstring).
        elbo_sum: detached sum of the batch's per-row ELBOs (annealing 1).
        tokens: observed tokens of this batch (this rank's).
        terms: the ELBO terms; ``terms.x`` is the sampled ``(batch, time, state)`` path (the
            windows regime carries its last states).
    """

    loss: torch.Tensor
    elbo_sum: torch.Tensor
    tokens: int
    terms: ElboTerms

    @property
    def elbo_per_token(self) -> float:
        return float(self.elbo_sum) / max(self.tokens, 1)

    def split_per_token(self) -> tuple[float, float]:
        """``(reconstruction, kl)`` per token of this batch: ``-sum log p(y|x) / tokens`` and
        ``sum [log q - log p(x_k|x_{k-1})] / tokens`` (not annealed)."""
        with torch.no_grad():
            t = self.terms
            recon = -float(t.log_lik.sum()) / self.tokens
            kl = float((t.log_guide - t.log_latent).sum()) / self.tokens
        return recon, kl


def svi_loss(
    vmt,
    batch: ChainBatch,
    config,
    annealing: float,
    skip: int | None,
    totals: LossTotals | None = None,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossResult:
    """The SVI loss of ``batch`` (module docstring).

    Args:
        vmt: the model.
        batch: the batch, on the model's device.
        config: the :class:`vmt.inference.train.TrainConfig` (``regime``, ``direction``,
            ``aux_weight``, ``distill_weight``).
        annealing: KL annealing factor.
        skip: the skip length of the auxiliary skip loss (``None``: none).
        totals: counts over all ranks (``None``: this batch alone, one process).
        teacher: ``(ids, probs)``, the teacher's top next tokens of the window, each
            ``(batch, time, k)``, when ``config.distill_weight > 0`` (one process only).

    Returns:
        :class:`LossResult`.
    """
    if teacher is not None and totals is not None:
        raise ValueError("distillation runs in the single-process trainer only")
    with torch.autocast(batch.obs.device.type, enabled=False):
        terms = elbo_terms(vmt, batch, config.direction)
        if totals is None:
            loss = _loss_alone(vmt, batch, config, annealing, skip, terms, teacher)
        else:
            loss = _loss_share(batch, config, annealing, skip, terms, totals)
    tokens = int(terms.mask.sum())
    return LossResult(loss, terms.elbo_per_row().sum().detach(), tokens, terms)


def _loss_alone(vmt, batch, config, annealing, skip, terms, teacher) -> torch.Tensor:
    if config.regime == "subsequence":
        lengths = terms.tokens_per_row().to(terms.x.dtype)
        loss = -terms.elbo_per_row(annealing).mean() / lengths.mean()
    else:
        loss = -terms.elbo_per_row(annealing).sum() / terms.mask.sum()
    if teacher is not None:
        ids, probs = teacher
        log_probs = vmt.emission.predictive_log_probs(terms.x)
        ce = soft_cross_entropy(log_probs, ids.to(log_probs.device), probs.to(log_probs.device), terms.mask)
        loss = loss + config.distill_weight * ce
    if config.aux_weight > 0:
        aux = auxiliary_losses(terms, batch, skip)
        loss = loss + config.aux_weight * (aux["init"] + aux["prior"] + aux["skip"])
    return loss


def _loss_share(batch, config, annealing, skip, terms, totals: LossTotals) -> torch.Tensor:
    world = totals.world_size
    tokens, init_total, skip_total = (max(v, 1) for v in (totals.tokens, totals.init, totals.pairs))
    loss = -terms.elbo_per_row(annealing).sum() * (world / tokens)
    if config.aux_weight > 0:
        aux = auxiliary_losses(terms, batch, skip)
        init, pairs = aux_counts(batch, skip)
        aux_loss = (
            aux["init"] * (init / init_total)
            + aux["prior"] * (terms.mask.sum() / tokens)
            + aux["skip"] * (pairs / skip_total)
        )
        loss = loss + config.aux_weight * world * aux_loss
    return loss


def check_finite_parameters(vmt, step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming the first parameter that is not finite."""
    for name, p in vmt.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteLoss(f"non-finite parameter {name} after step {step}")


def optimiser_step(
    vmt,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    config,
    step: int,
    loss_value: Callable[[], float] | None = None,
) -> None:
    """Backward and one Adam step at the rate of ``step`` (0-based), with the checks.

    Args:
        vmt: the model (its parameters are checked after the step).
        optimizer: its optimiser.
        loss: the scalar loss.
        config: the :class:`TrainConfig` (``clip_norm``, the learning-rate schedule).
        step: the number of steps taken before this one.
        loss_value: called after ``backward`` for the value to check (a distributed trainer
            all-reduces the losses of all ranks there, so every rank decides alike); default:
            the loss, checked before ``backward``.

    Raises:
        NonFiniteLoss: the loss, the gradient norm or a parameter is not finite (the optimiser
            has not stepped, except for a non-finite parameter, which is reported after it).
    """
    if loss_value is None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite loss ({value}) at step {step + 1}")
    optimizer.zero_grad()
    loss.backward()
    if loss_value is not None:
        value = loss_value()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite loss ({value}) at step {step + 1}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, config.clip_norm if config.clip_norm is not None else math.inf)
    if not math.isfinite(float(norm)):
        raise NonFiniteLoss(f"non-finite gradient norm at step {step + 1}")
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate_at(step)
    optimizer.step()
    check_finite_parameters(vmt, step + 1)
