"""Held-out negative ELBO and the importance-weighted bound (IWAE-k) per token.

Each document is one chain read in windows with the state carried, exactly as in training;
``k`` particles are independent whole-document paths from the guide. For particle ``i``,
``log w_i = log p(y, x^i) - log q(x^i | y)`` summed over all windows, so

* ``ELBO = mean_i log w_i``            (per document)
* ``IWAE_k = logsumexp_i log w_i - log k``  (``ELBO <= IWAE_k <= log p(y)``, tightening with k)

and both negatives, divided by the number of tokens, are upper bounds on the per-token NLL:
``exp`` of them bounds the perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vmt.inference.elbo import elbo_terms
from vmt.inference.subsequences import FeatureLookup
from vmt.inference.windows import DocumentStreams, batch_to


@dataclass(frozen=True)
class EvalResult:
    """Bounds on the held-out negative log-likelihood, in nats per token."""

    tokens: int
    documents: int
    particles: int
    neg_elbo_per_token: float
    iwae_per_token: float

    @property
    def perplexity_bound(self) -> float:
        """``exp(-IWAE_k / tokens)``: an upper bound on the perplexity."""
        return math.exp(self.iwae_per_token)


@torch.no_grad()
def evaluate(
    vmt,
    documents: Sequence[torch.Tensor],
    features: FeatureLookup | None = None,
    window: int = 256,
    particles: int = 8,
    streams: int = 4,
    token_penalty: torch.Tensor | None = None,
) -> EvalResult:
    """Bound the held-out NLL of ``documents``.

    Args:
        vmt: a fitted VMT.
        documents: ``(time,)`` tokens or ``(time, obs)`` arrays.
        features: cached guide features per document (``None`` if the VMT has a reader).
        window: window length of the reading (the state is carried across windows).
        particles: ``k`` of the IWAE bound (the ELBO is the mean over the same particles).
        streams: documents read side by side.
        token_penalty: optional ``(vocab,)`` nats added for each observed token id, e.g.
            ``log(#tokens merged into <unk>)`` so that a compact vocabulary still gives a
            bound over the full one.

    Windows are moved to the device of the model's parameters; carried states and importance
    weights keep the device and dtype of the model's sampled states.
    """
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    empty = [i for i, d in enumerate(documents) if len(d) == 0]
    if empty:
        raise ValueError(f"cannot evaluate empty documents (indices {empty[:5]}): every document needs a token")
    if len(documents) == 0:
        raise ValueError("no documents to evaluate")
    vmt.eval()
    device = next(vmt.parameters()).device
    logw: dict[int, torch.Tensor] = {}
    carried: dict[int, torch.Tensor] = {}
    tokens = 0
    penalty = 0.0
    reader = DocumentStreams(documents, streams, window, features)
    for win in reader:
        if token_penalty is not None:
            cpu = win.batch
            ids = cpu.obs[cpu.mask()].to(token_penalty.device)
            penalty += float(token_penalty[ids].sum())
        b = batch_to(win.batch, device)
        rows = b.num_rows
        idx = torch.arange(rows, device=device).repeat_interleave(particles)
        batch = b.with_(
            obs=b.obs[idx], start=b.start[idx], end=b.end[idx], source=idx,
            carried=b.carried[idx] if b.carried is not None else None,
        )
        if bool(batch.carried_rows().any()):
            x0 = next(iter(carried.values())).new_zeros(rows * particles, vmt.config.state_dim)
            for r, d in enumerate(win.documents):
                if win.offsets[r] > 0:
                    x0[r * particles : (r + 1) * particles] = carried[d]
            batch = batch.with_(x0=x0)
        else:
            batch = batch.with_(carried=None)
        terms = elbo_terms(vmt, batch)
        w = terms.elbo_per_row().view(rows, particles)
        last = terms.x[:, -1].view(rows, particles, -1)
        for r, d in enumerate(win.documents):
            logw[d] = logw.get(d, w.new_zeros(particles)) + w[r]
            carried[d] = last[r]
        tokens += int(b.mask().sum())
    elbo = sum(float(v.mean()) for v in logw.values())
    iwae = sum(float(torch.logsumexp(v, 0)) - math.log(particles) for v in logw.values())
    return EvalResult(
        tokens=tokens,
        documents=len(logw),
        particles=particles,
        neg_elbo_per_token=(-elbo + penalty) / tokens,
        iwae_per_token=(-iwae + penalty) / tokens,
    )
