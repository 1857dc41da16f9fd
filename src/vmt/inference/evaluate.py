"""Held-out negative ELBO and the importance-weighted bound (IWAE-k) per token, with the
diagnostics that tell a model whose state carries the text from a collapsed one.

Each document is one chain read in windows with the state carried, exactly as in training;
``k`` particles are independent whole-document paths from the guide. For particle ``i``,
``log w_i = log p(y, x^i) - log q(x^i | y)`` summed over all windows, so

* ``ELBO = mean_i log w_i``            (per document)
* ``IWAE_k = logsumexp_i log w_i - log k``  (``ELBO <= IWAE_k <= log p(y)``, tightening with k)

and both negatives, divided by the number of tokens, are upper bounds on the per-token NLL:
``exp`` of them bounds the perplexity.

Diagnostics, from the same particles (``E_q`` is the mean over particles, per token the sum
over every held-out position divided by the number of tokens):

* ``reconstruction = -E_q log p(y_k | x_k)`` (compact vocabulary), ``kl = E_q[log q(x_k | .) -
  log p(x_k | x_{k-1})]`` (``log p(x_1)`` at a fresh start) and ``oov`` (the token penalty), so
  that ``-ELBO = reconstruction + kl + oov``. A collapsed posterior has ``kl ~ 0``.
* Explained variance per state dimension (law of total variance over held-out positions):
  ``between = Var_k(E_q[x_k])`` and ``within = mean_k Var_q[x_k]``, fraction
  ``between / (between + within)``: the share of a dimension's spread that depends on the
  text. With ``k`` particles the empirical posterior mean carries sampling noise of variance
  ``Var_q / k``; ``between`` is corrected for it (unbiased; clipped at 0) and ``within`` uses
  the unbiased ``k - 1`` divisor, so a collapsed model reports ~0, not ``1 / k``. The same
  ``between`` divided by the prior's marginal variance per dimension is
  ``prior_variance_fraction``; Burda et al.'s active units count the dimensions with
  ``between > 0.01``.
* Mutual information between a state and its token, two estimates in nats per token:
  ``mutual_information`` is the Barber-Agakov lower bound ``H(y) - reconstruction`` with the
  emission as decoder, ``H(y)`` the plug-in entropy of the held-out tokens over the compact
  vocabulary (it can be negative when the emission predicts worse than the held-out unigram
  frequencies); ``mutual_information_nce`` is the InfoNCE lower bound with the emission as
  critic, contrasting each position's token with the states of the other positions of its
  window (one particle): ``mean_i [log p(y_i|x_i) - log mean_j p(y_i|x_j)]``. It needs no
  entropy estimate and is ~0 for a collapsed posterior, but cannot exceed ``log N`` (``N`` the
  positions of a window, ``streams * window`` at most).

Memory stays bounded by the number of streams: a document's running sums are kept only while
it is being read; afterwards only its totals (:class:`DocumentBound`) remain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vmt.inference.elbo import elbo_terms
from vmt.inference.subsequences import FeatureLookup
from vmt.inference.windows import (
    DocumentStreams,
    Window,
    attach_carried,
    batch_to,
    continuing_states,
)
from vmt.models.batch import ChainBatch

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

ACTIVE_UNIT_THRESHOLD = 0.01
EXPLAINED_THRESHOLD = 0.1


@dataclass(frozen=True)
class DocumentBound:
    """One held-out document's totals, in nats (sums over its tokens, not per token).

    Attributes:
        index: position of the document in the list given to :func:`evaluate`.
        tokens: its number of tokens.
        neg_elbo: ``-mean_i log w_i`` plus its token penalty.
        neg_iwae: ``-(logsumexp_i log w_i - log k)`` plus its token penalty.
        oov: its token penalty (included in both bounds).
    """

    index: int
    tokens: int
    neg_elbo: float
    neg_iwae: float
    oov: float


@dataclass(frozen=True)
class EvalResult:
    """Bounds on the held-out negative log-likelihood, in nats per token, and diagnostics.

    ``neg_elbo_per_token == reconstruction_per_token + kl_per_token + oov_per_token`` (up to
    float64 rounding). Fields that need at least two particles (the explained variance, the
    prior-variance fraction, the active units) are ``None`` with one particle; the
    per-dimension tuples are then empty. See the module docstring for the definitions.

    Both bounds are negatives, upper bounds on the NLL: ``neg_elbo_per_token`` is
    ``-ELBO / tokens`` and ``neg_iwae_per_token`` is ``-IWAE_k / tokens`` (so
    ``neg_iwae_per_token <= neg_elbo_per_token``); ``iwae_per_token`` is the older name of
    the latter, kept as an alias.
    """

    tokens: int
    documents: int
    particles: int
    neg_elbo_per_token: float
    neg_iwae_per_token: float
    reconstruction_per_token: float = math.nan
    kl_per_token: float = math.nan
    oov_per_token: float = 0.0
    token_entropy: float | None = None
    mutual_information: float | None = None
    mutual_information_nce: float | None = None
    explained_variance_max: float | None = None
    explained_variance_mean: float | None = None
    explained_dims: int | None = None
    prior_variance_fraction_max: float | None = None
    prior_variance_fraction_mean: float | None = None
    active_units: int | None = None
    explained_variance: tuple[float, ...] = ()
    prior_variance_fraction: tuple[float, ...] = ()
    posterior_mean_variance: tuple[float, ...] = ()
    posterior_variance: tuple[float, ...] = ()
    prior_variance: tuple[float, ...] = ()
    per_document: tuple[DocumentBound, ...] = ()

    @property
    def iwae_per_token(self) -> float:
        """Deprecated name of :attr:`neg_iwae_per_token` (``-IWAE_k / tokens``, a negative
        bound despite the name)."""
        return self.neg_iwae_per_token

    @property
    def perplexity_bound(self) -> float:
        """``exp(-IWAE_k / tokens)``: an upper bound on the perplexity."""
        return math.exp(self.neg_iwae_per_token)

    def summary(self) -> str:
        """A few lines for reports: the split of the bound and the state's use of the text."""
        lines = [
            f"  reconstruction       {self.reconstruction_per_token:.4f} nats/token "
            "(-E_q log p(y|x), compact vocabulary)",
            f"  KL                   {self.kl_per_token:.4f} nats/token",
            f"  out-of-vocabulary    {self.oov_per_token:.4f} nats/token",
        ]
        if self.mutual_information is not None:
            lines.append(
                f"  I(state; token)     >= {self.mutual_information:.4f} nats (Barber-Agakov, "
                f"H(y) = {self.token_entropy:.4f}); "
                f">= {self.mutual_information_nce:.4f} nats (InfoNCE)"
            )
        if self.explained_variance_max is not None:
            dims = len(self.explained_variance)
            lines.append(
                f"  explained variance   max {self.explained_variance_max:.3f}, mean "
                f"{self.explained_variance_mean:.3f}; {self.explained_dims} of {dims} dims > "
                f"{EXPLAINED_THRESHOLD} (share of each dimension's spread that depends on the text)"
            )
            lines.append(
                f"  Var(posterior mean) / prior variance: max "
                f"{self.prior_variance_fraction_max:.3f}, mean "
                f"{self.prior_variance_fraction_mean:.3f}; active units (> "
                f"{ACTIVE_UNIT_THRESHOLD}) {self.active_units} of {dims}"
            )
        return "\n".join(lines)


def prior_marginal_variance(vmt: VariationalMarkovTransformer, samples: int = 8192, seed: int = 0) -> torch.Tensor:
    """``(state,)`` variance of each dimension of the prior ``p(x)``.

    Exact when the distribution knows its variance (a Gaussian mixture: the law of total
    variance over components); otherwise (a flow) estimated from ``samples`` draws under a
    fixed seed, without touching the global random stream.
    """
    prior = vmt.prior.distribution()
    try:
        return prior.variance.detach()
    except NotImplementedError:
        pass
    devices = [p.device for p in vmt.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(seed)
        draws = prior.sample((samples,))
    return draws.detach().var(0)


class _Moments:
    """Running float64 sums over positions of the particle mean and variance of the state."""

    def __init__(self) -> None:
        self.count = 0
        self.mean_sum: torch.Tensor | None = None
        self.mean_sq_sum: torch.Tensor | None = None
        self.var_sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """``x``: ``(batch, draw, time, state)``; ``mask``: ``(batch, time)`` active positions."""
        x = x.detach().double()
        mean = x.mean(1)[mask]  # (positions, state)
        var = x.var(1, correction=1)[mask]
        if self.mean_sum is None:
            self.mean_sum = mean.new_zeros(mean.shape[-1])
            self.mean_sq_sum = mean.new_zeros(mean.shape[-1])
            self.var_sum = mean.new_zeros(mean.shape[-1])
        self.count += mean.shape[0]
        self.mean_sum += mean.sum(0)
        self.mean_sq_sum += (mean * mean).sum(0)
        self.var_sum += var.sum(0)

    def between_within(self, particles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state,)`` unbiased ``Var_k(E_q x_k)`` (clipped at 0) and ``mean_k Var_q x_k``."""
        n = self.count
        centre = self.mean_sum / n
        spread = (self.mean_sq_sum / n - centre * centre) * n / max(n - 1, 1)
        within = self.var_sum / n
        return (spread - within / particles).clamp(min=0), within


def _nce_terms(vmt: VariationalMarkovTransformer, x: torch.Tensor, y: torch.Tensor, max_elements: int = 2**22) -> float:
    """``sum_i [log p(y_i|x_i) - log mean_j p(y_i|x_j)]`` over ``N`` positions.

    ``x``: ``(N, state)``, ``y``: ``(N,)`` tokens or ``(N, obs)`` observations. States are
    taken in chunks so that at most ``max_elements`` (chunk, N, obs) values exist at once (a
    categorical emission gathers from a broadcast view and needs only (chunk, N)).
    """
    n = x.shape[0]
    width = y[0].numel() if y.is_floating_point() else 1
    chunk = max(1, max_elements // (n * width))
    rows = []
    for lo in range(0, n, chunk):
        emit = vmt.emission.distribution(x[lo : lo + chunk].unsqueeze(1))  # batch (chunk, 1)
        rows.append(emit.log_prob(y.unsqueeze(0)).double())  # (chunk, N): log p(y_i | x_j)
    scores = torch.cat(rows, 0)  # [j, i]
    positive = scores.diagonal()
    return float((positive - torch.logsumexp(scores, 0) + math.log(n)).sum())


class _Bounds:
    """The running sums of :func:`evaluate`: per document being read, its ``(particles,)``
    log-weights, token penalty and carried ``(particles, state)`` states (dropped when it
    ends, so at most one entry per stream), and the finished documents' totals."""

    def __init__(self, lengths: Sequence[int], particles: int) -> None:
        self.lengths, self.particles = lengths, particles
        self.logw: dict[int, torch.Tensor] = {}
        self.penalty: dict[int, float] = {}
        self.carried: dict[int, torch.Tensor] = {}
        self.finished: list[DocumentBound] = []
        self.recon = self.kl = 0.0

    def add_penalty(self, win: Window, token_penalty: torch.Tensor) -> None:
        """Add the token penalty of each row's observed tokens to its document's."""
        cpu = win.batch
        pen = token_penalty[cpu.obs.to(token_penalty.device)].double()  # (batch, time)
        pen = torch.where(cpu.mask().to(pen.device), pen, torch.zeros_like(pen)).sum(-1)
        for r, d in enumerate(win.documents):
            self.penalty[d] = self.penalty.get(d, 0.0) + float(pen[r])

    def add(self, win: Window, terms, rows: int) -> None:
        """Add a window's ELBO terms (``rows * particles`` rows) and carry its last states."""
        k = self.particles
        lik = terms.log_lik.double().sum(-1).view(rows, k)
        gap = (terms.log_guide.double() - terms.log_latent.double()).sum(-1).view(rows, k)
        self.recon -= float(lik.mean(1).sum())
        self.kl += float(gap.mean(1).sum())
        w = lik - gap  # (batch, particles) log-weights of the window
        last = terms.x[:, -1].view(rows, k, -1)  # (batch, particles, state)
        self.carried = continuing_states(win, last, self.lengths)
        for r, d in enumerate(win.documents):
            self.logw[d] = self.logw.get(d, w.new_zeros(k)) + w[r]
            if d not in self.carried:  # the document ends in this window: keep its totals only
                self.finish(d)

    def finish(self, d: int) -> None:
        v = self.logw.pop(d)
        oov = self.penalty.pop(d, 0.0)
        self.finished.append(DocumentBound(
            index=d, tokens=self.lengths[d], neg_elbo=-float(v.mean()) + oov,
            neg_iwae=-(float(torch.logsumexp(v, 0)) - math.log(self.particles)) + oov, oov=oov,
        ))


class _Diagnostics:
    """The running sums of the state diagnostics: moments, InfoNCE terms, token counts."""

    def __init__(self, vmt, particles: int) -> None:
        self.vmt, self.particles = vmt, particles
        self.moments = _Moments()
        self.counts: torch.Tensor | None = None
        self.nce = 0.0

    def add(self, x: torch.Tensor, b: ChainBatch, mask: torch.Tensor) -> None:
        """``x``: ``(batch, particles, time, state)``; ``b`` the window's batch, ``mask``
        ``(batch, time)``."""
        if self.particles > 1:
            self.moments.add(x, mask)
        self.nce += _nce_terms(self.vmt, x[:, 0][mask], b.obs[mask])
        if not b.obs.is_floating_point():
            seen = torch.bincount(b.obs[mask].flatten().cpu(), minlength=self.vmt.config.obs_dim)
            self.counts = seen if self.counts is None else self.counts + seen[: self.counts.numel()]

    def fields(self, tokens: int, recon: float) -> dict:
        """The :class:`EvalResult` fields of the diagnostics."""
        out: dict = {"mutual_information_nce": self.nce / tokens}
        if self.counts is not None:
            p = self.counts.double() / self.counts.sum()
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
            out["token_entropy"] = entropy
            out["mutual_information"] = entropy - recon / tokens
        if self.particles > 1 and self.moments.count > 1:
            between, within = self.moments.between_within(self.particles)
            explained = between / (between + within).clamp(min=1e-300)
            prior_var = prior_marginal_variance(self.vmt).to(between)
            fraction = between / prior_var
            out.update(
                explained_variance_max=float(explained.max()),
                explained_variance_mean=float(explained.mean()),
                explained_dims=int((explained > EXPLAINED_THRESHOLD).sum()),
                prior_variance_fraction_max=float(fraction.max()),
                prior_variance_fraction_mean=float(fraction.mean()),
                active_units=int((between > ACTIVE_UNIT_THRESHOLD).sum()),
                explained_variance=tuple(explained.tolist()),
                prior_variance_fraction=tuple(fraction.tolist()),
                posterior_mean_variance=tuple(between.tolist()),
                posterior_variance=tuple(within.tolist()),
                prior_variance=tuple(prior_var.tolist()),
            )
        return out


@torch.no_grad()
def evaluate(
    vmt: VariationalMarkovTransformer,
    documents: Sequence[torch.Tensor],
    features: FeatureLookup | None = None,
    window: int = 256,
    particles: int = 8,
    streams: int = 4,
    token_penalty: torch.Tensor | None = None,
    diagnostics: bool = True,
) -> EvalResult:
    """Bound the held-out NLL of ``documents`` and measure how much the state carries.

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
        diagnostics: also compute the explained variance and the mutual-information
            estimates (the split of the bound and the per-document totals are always there).

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
    reader = DocumentStreams(documents, streams, window, features)
    bounds = _Bounds(reader.lengths, particles)
    diag = _Diagnostics(vmt, particles)
    tokens = 0
    for win in reader:
        b = batch_to(win.batch, device)
        rows, steps = b.num_rows, b.num_steps
        mask = b.mask()  # (batch, time)
        if token_penalty is not None:
            bounds.add_penalty(win, token_penalty)
        # every row repeated per particle, each particle continuing its own carried state
        batch = batch_to(attach_carried(win, bounds.carried, vmt.config.state_dim, particles), device)
        terms = elbo_terms(vmt, batch)
        bounds.add(win, terms, rows)
        tokens += int(mask.sum())
        if diagnostics:
            diag.add(terms.x.view(rows, particles, steps, -1), b, mask)
    finished = sorted(bounds.finished, key=lambda doc: doc.index)
    neg_elbo = sum(doc.neg_elbo for doc in finished)
    neg_iwae = sum(doc.neg_iwae for doc in finished)
    out = dict(
        tokens=tokens,
        documents=len(finished),
        particles=particles,
        neg_elbo_per_token=neg_elbo / tokens,
        neg_iwae_per_token=neg_iwae / tokens,
        reconstruction_per_token=bounds.recon / tokens,
        kl_per_token=bounds.kl / tokens,
        oov_per_token=sum(doc.oov for doc in bounds.finished) / tokens,
        per_document=tuple(finished),
    )
    if diagnostics:
        out.update(diag.fields(tokens, bounds.recon))
    return EvalResult(**out)
