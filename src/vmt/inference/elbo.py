"""ELBO terms of a batch of chains, computed from Pyro traces in one vectorised pass.

``elbo_terms`` runs the guide (the only sequential part: sampling the path), replays the
model on the sampled path, and returns the log-density terms of every position, from which
every loss of the training regimes is a reduction:

    ELBO(row) = sum_k [ log p(y_k | x_k) + log p(x_k | x_{k-1}) - log q(x_k | ...) ]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pyro import poutine

from vmt.models.batch import ChainBatch
from vmt.models.chain import ChainPrior, GuideChain
from vmt.models.tokens import sharing_scores

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


@dataclass
class ElboTerms:
    """Per-position terms, each ``(batch, time)`` and zero where a row is inactive.

    Attributes:
        x: ``(batch, time, state)`` the sampled path.
        log_latent: ``log p(x_k | x_{k-1})`` (or ``log p(x_k)`` at a fresh start).
        log_guide: ``log q(x_k | ...)``.
        log_lik: ``log p(y_k | x_k)``.
        mask: active positions.
        model_chain, guide_chain: the two chain distributions (for auxiliary losses).
    """

    x: torch.Tensor
    log_latent: torch.Tensor
    log_guide: torch.Tensor
    log_lik: torch.Tensor
    mask: torch.Tensor
    model_chain: ChainPrior
    guide_chain: GuideChain

    def elbo_per_row(self, annealing: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch,)``: ``sum_k w_k [log p(y_k|x_k) + annealing * (log p(x_k|x_{k-1}) - log q(x_k|.))]``
        with ``w = weight (batch, time)``, or 1 (the ELBO) when ``weight`` is ``None``.

        A weight other than 1 makes a training objective, not a bound: it scales whole
        per-position terms, so where the terms of a position cancel to a next-token
        log-probability (the token family, :mod:`vmt.models.tokens`) it scales that one."""
        terms = self.log_lik + annealing * (self.log_latent - self.log_guide)
        if weight is not None:
            terms = terms * weight.to(terms.dtype)
        return terms.sum(-1)

    def tokens_per_row(self) -> torch.Tensor:
        return self.mask.sum(-1)


def elbo_terms(vmt: VariationalMarkovTransformer, batch: ChainBatch, direction: str = "forward") -> ElboTerms:
    """Sample a path from the guide and score it under model and guide."""
    emission = vmt.config.emission
    if vmt.config.emits_tokens and (batch.obs.is_floating_point() or batch.obs.dim() != 2):
        raise ValueError(f"a {emission} emission takes (batch, time) integer token ids, got {batch.obs.dtype} "
                         f"observations of shape {tuple(batch.obs.shape)} (one-hot vectors? pass their argmax)")
    if not vmt.config.emits_tokens and not batch.obs.is_floating_point():
        raise ValueError(f"a {emission} emission takes float (batch, time, obs) observations, got "
                         f"{batch.obs.dtype} of shape {tuple(batch.obs.shape)} (convert with .float())")
    batch.validate(vmt.config.state_dim, vmt.config.obs_dim)
    guide_trace = poutine.trace(vmt.guide).get_trace(batch, direction=direction)
    model_trace = poutine.trace(poutine.replay(vmt.model, trace=guide_trace)).get_trace(
        batch, direction=direction
    )
    x = guide_trace.nodes["x"]["value"]
    guide_chain = guide_trace.nodes["x"]["fn"]
    model_chain = model_trace.nodes["x"]["fn"]
    with sharing_scores(vmt):  # the token family scores each state once for all terms
        return ElboTerms(
            x=x,
            log_latent=model_chain.log_prob_terms(x),
            log_guide=guide_chain.log_prob_terms(x),
            log_lik=model_trace.nodes["y"]["fn"].log_prob_terms(batch.obs),
            mask=batch.mask(),
            model_chain=model_chain,
            guide_chain=guide_chain,
        )


def auxiliary_losses(terms: ElboTerms, batch: ChainBatch, skip: int | None = None) -> dict[str, torch.Tensor]:
    """The auxiliary losses of the windowed regime, each a scalar averaged per term.

    * ``init``: ``-log q(x_1 | h_1, T)`` at carried starts — trains the cold-start guide on
      states the carried guide produced;
    * ``prior``: ``-log p(x_k)`` on every sampled state — pulls the prior towards the
      aggregate posterior;
    * ``skip``: ``-log q(x_{k+t} | x_k, h_{k+1}, t, T)`` on the sampled path for the skip
      ``t`` — trains (distils) the skip guide.

    Sampled states are detached: these losses train the named parts, not the path.
    """
    x = terms.x.detach()
    guide = terms.guide_chain
    net = guide.net
    out: dict[str, torch.Tensor] = {}
    carried_first = batch.first_mask() & batch.carried_rows()[:, None]
    if bool(carried_first.any()):
        first = guide.step_distribution(guide.first_loc, guide.first_scale, guide.first_combined)
        lp = first.log_prob(x)
        out["init"] = -lp[carried_first].mean()
    else:
        out["init"] = x.new_zeros(())
    prior_lp = terms.model_chain.prior.distribution().log_prob(x)
    out["prior"] = -prior_lp[terms.mask].mean()
    out["skip"] = x.new_zeros(())
    if skip is not None and skip >= 2 and batch.num_steps > skip:
        t = skip
        pos = batch.positions()
        # pairs (k, k + t) with both ends inside the row
        valid = (pos[: -t] >= batch.start[:, None]) & (pos[t:] < batch.end[:, None])
        if bool(valid.any()):
            ctx = net.skip_context(guide.context[:, 1 : batch.num_steps - t + 1], t)
            ctx = net.with_target(ctx, guide.context[:, t:])
            loc, scale, combined = net.step_params(x[:, :-t], ctx, skip=t)
            lp = guide.step_distribution(loc, scale, combined).log_prob(x[:, t:])
            out["skip"] = -lp[valid].mean()
    return out
