"""The loss SVI minimises, written once, and the optimiser step of the one trainer.

For a batch of ``batch`` rows and ``time`` steps with ELBO terms (:func:`elbo_terms`), the loss
over the union of the batches of ``W`` ranks (``W = 1``: one process) is
``-sum(ELBO) / T + aux_weight * (L_init + L_prior + L_skip) + distill_weight * CE``, where ``T``
counts the observed tokens of all ranks, each auxiliary term is a mean over its terms of all
ranks and ``CE`` (windows regime only) a mean over the tokens. In the subsequence regime
``-sum(ELBO) / T`` is ``-mean(ELBO_b) / mean(length_b)``, the mean negative ELBO per
subsequence on a per-token scale. A batch with a ``weight`` (``TrainConfig.emphasis``) weights
the ELBO's per-position terms in that sum (:meth:`~vmt.inference.elbo.ElboTerms.elbo_per_row`);
``T`` still counts tokens.

Rank ``r`` computes its share ``W * (-sum_r(ELBO) / T + w * sum_r(aux) / A + ...)`` with the
counts ``T`` and ``A`` summed over the ranks (:class:`LossTotals`); DDP averages the gradients,
which makes them the gradients of the loss over the union of the ranks' batches. A single
process is the case ``W = 1`` with the counts of its own batch: there is one formula, and
:class:`SVILoss` is the module both launch modes of :class:`vmt.inference.train.Trainer` call.

:func:`optimiser_step` is the step after the loss: backward, the non-finite checks, clipping,
the learning rate of the step (:meth:`TrainConfig.learning_rate_at`) and Adam (AdamW, with the
decay decoupled from the gradient, when ``weight_decay > 0``: :func:`make_optimizer`). :func:`reseed`
seeds every random stream of a step from ``(seed, step, rank)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vmt.encoders.teacher import soft_cross_entropy
from vmt.inference.elbo import ElboTerms, auxiliary_losses, elbo_terms
from vmt.models.batch import ChainBatch

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


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


def batch_counts(batch: ChainBatch, skip: int | None) -> torch.Tensor:
    """``(3,)`` int64 counts of ``batch`` that :class:`LossTotals` sums over the ranks: observed
    tokens, carried first states and skip pairs (:func:`aux_counts`)."""
    init, pairs = aux_counts(batch, skip)
    return torch.tensor([int(batch.mask().sum()), init, pairs], dtype=torch.int64)


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

    def split_sums(self) -> torch.Tensor:
        """``(2,)`` detached sums over this batch of the negative ELBO's two parts:
        reconstruction ``-sum log p(y|x)`` and KL ``sum [log q - log p(x_k|x_{k-1})]`` (not
        annealed)."""
        with torch.no_grad():
            t = self.terms
            return torch.stack([-t.log_lik.sum(), (t.log_guide - t.log_latent).sum()])

    def split_per_token(self) -> tuple[float, float]:
        """``(reconstruction, kl)`` per token of this batch (:meth:`split_sums` / tokens)."""
        recon, kl = (float(v) / max(self.tokens, 1) for v in self.split_sums())
        return recon, kl


def svi_loss(
    vmt: VariationalMarkovTransformer,
    batch: ChainBatch,
    config,
    annealing: float,
    skip: int | None,
    totals: LossTotals | None = None,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossResult:
    """The SVI loss of ``batch``, this rank's share (module docstring).

    Args:
        vmt: the model.
        batch: the batch, on the model's device.
        config: the :class:`vmt.inference.train.TrainConfig` (``direction``, ``aux_weight``,
            ``distill_weight``).
        annealing: KL annealing factor.
        skip: the skip length of the auxiliary skip loss (``None``: none).
        totals: counts over all ranks (``None``: this batch's own, one process).
        teacher: ``(ids, probs)``, the teacher's top next tokens of the window, each
            ``(batch, time, k)``, when ``config.distill_weight > 0``.

    Returns:
        :class:`LossResult`.
    """
    if totals is None:
        totals = LossTotals.of(batch_counts(batch, skip), 1)
    with torch.autocast(batch.obs.device.type, enabled=False):
        terms = elbo_terms(vmt, batch, config.direction)
        loss = _loss_share(vmt, batch, config, annealing, skip, terms, totals, teacher)
    tokens = int(terms.mask.sum())
    return LossResult(loss, terms.elbo_per_row().sum().detach(), tokens, terms)


def _loss_share(vmt: VariationalMarkovTransformer, batch, config, annealing, skip, terms, totals: LossTotals, teacher) -> torch.Tensor:
    world = totals.world_size
    tokens, init_total, skip_total = (max(v, 1) for v in (totals.tokens, totals.init, totals.pairs))
    loss = -terms.elbo_per_row(annealing, batch.weight).sum() * (world / tokens)
    if teacher is not None:
        ids, probs = teacher
        log_probs = vmt.emission.predictive_log_probs(terms.x)
        ce = soft_cross_entropy(log_probs, ids.to(log_probs.device), probs.to(log_probs.device), terms.mask)
        loss = loss + config.distill_weight * world * ce * (terms.mask.sum() / tokens)
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


class SVILoss(nn.Module):
    """:func:`svi_loss` as a module, so DDP can wrap it (the VMT is its submodule): the one loss
    of both launch modes of :class:`vmt.inference.train.Trainer`.

    Args:
        vmt: the model (a submodule, so its parameters are this module's).
        config: the training settings (``direction``, ``aux_weight``, ``distill_weight``).
    """

    def __init__(self, vmt: nn.Module, config) -> None:
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
        teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LossResult:
        """This rank's share of the loss (:func:`svi_loss`).

        Args:
            batch: this rank's batch (on the model's device).
            annealing: KL annealing factor.
            skip: the skip length of the auxiliary skip loss (``None``: none).
            totals: ``(3,)`` counts over all ranks: tokens, carried first states, skip pairs
                (:func:`batch_counts` summed over the ranks).
            world_size: number of ranks whose gradients DDP averages.
            teacher: the distillation targets of the window (``(batch, time, k)`` ids and
                probabilities), or ``None``.

        Returns:
            :class:`LossResult` (``loss`` as in the module docstring, ``elbo_sum`` of this
            rank's rows, ``terms.x`` the sampled path).
        """
        return svi_loss(self.vmt, batch, self.config, annealing, skip,
                        LossTotals.of(totals, world_size), teacher)


def check_finite_parameters(vmt: VariationalMarkovTransformer, step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming the first parameter that is not finite."""
    for name, p in vmt.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteLoss(f"non-finite parameter {name} after step {step}")


def make_optimizer(params, config) -> torch.optim.Optimizer:
    """Adam over ``params``, or AdamW when ``config.weight_decay > 0``: every step shrinks each
    parameter by ``lr * weight_decay`` times itself, apart from the gradient, so the decay
    follows the learning-rate schedule."""
    if config.weight_decay > 0:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.learning_rate)


def optimiser_step(
    vmt: VariationalMarkovTransformer,
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
    for group in optimizer.param_groups:  # the config decides, also over a resumed optimiser's state
        group["lr"] = config.learning_rate_at(step)
        group["weight_decay"] = config.weight_decay
    optimizer.step()
    check_finite_parameters(vmt, step + 1)
