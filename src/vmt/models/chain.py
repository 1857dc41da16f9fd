"""Whole-chain distributions: one Pyro site holds every state of every row.

* :class:`ChainPrior` — ``p(x_{start}) * prod p(x_{k+1} | x_k)`` scored for all positions at
  once (the model side);
* :class:`GuideChain` — samples the path step by step (that part is inherently sequential)
  but scores a given path in one vectorised pass (the guide side);
* :class:`SequenceEmission` — ``prod_k p(y_k | x_k)`` over active positions.

Each has ``log_prob_terms(value) -> (..., batch, time)`` (zero at inactive positions) and
``log_prob(value) = log_prob_terms(value).sum(-1)``. Their batch shape is ``(batch,)`` as
built and follows Pyro's distribution contract beyond it: :meth:`expand` to any shape
``(..., batch)`` (e.g. ``(particle, batch)`` under a vectorised-particles plate), samples of
shape ``sample_shape + batch_shape + event_shape``, and ``log_prob`` of values with leading
dimensions. Positions are stepped over in time; every leading dimension rides along in the
same tensor operations, so a ``(draw, batch)`` expansion draws exactly what ``draw`` stacked
copies of the batch would (one standard-normal draw of the whole ``(..., batch, state)``
block per time step).
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from vmt.models.batch import ChainBatch
from vmt.models.lean_loop import lean_loop_applies, lean_rsample


def previous_states(x: torch.Tensor, batch: ChainBatch) -> torch.Tensor:
    """``(..., batch, time, state)``: the state each position of ``x (..., batch, time, state)``
    conditions on.

    Position ``k`` conditions on ``x_{k-1}``, except a carried row's first position, which
    conditions on ``x0``. Where nothing precedes (position 0 of an uncarried row) zeros stand in;
    those positions are scored by the prior, not the transition.
    """
    prev = torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], dim=-2)
    if batch.x0 is not None:
        use_x0 = (batch.first_mask() & batch.carried_rows()[:, None]).unsqueeze(-1)
        prev = torch.where(use_x0, batch.x0[:, None, :].to(x.dtype), prev)
    return prev


def _expanded_shape(current: torch.Size, batch_shape, what: str) -> torch.Size:
    """``batch_shape`` if ``current`` broadcasts to it (torch's ``expand`` rule), else an error."""
    batch_shape = torch.Size(batch_shape)
    try:
        broadcast = torch.broadcast_shapes(current, batch_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != batch_shape:
        raise ValueError(f"{what} with batch shape {tuple(current)} cannot be expanded to {tuple(batch_shape)}")
    return batch_shape


def _broadcast_batch(log_prob: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """A log-density over values with fewer leading dimensions than the batch, broadcast to it
    (as ``torch.distributions`` does)."""
    shape = torch.broadcast_shapes(log_prob.shape, batch_shape)
    return log_prob if shape == log_prob.shape else log_prob.expand(shape)


class _ChainDistribution(TorchDistribution):
    """Batch shape ``(..., batch)``, event shape ``(time, state)``."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, batch: ChainBatch, state_dim: int, batch_shape=None):
        self.chain_batch = batch
        self.state_dim = state_dim
        own = torch.Size([batch.num_rows])
        super().__init__(
            batch_shape=own if batch_shape is None else _expanded_shape(own, batch_shape, "a chain"),
            event_shape=torch.Size([batch.num_steps, state_dim]),
            validate_args=False,
        )

    def expand(self, batch_shape, _instance=None):
        """The same chains with batch shape ``(..., batch)``: independent draws along the new
        leading dimensions (nothing is copied)."""
        batch_shape = _expanded_shape(self.batch_shape, batch_shape, "a chain")
        new = copy.copy(self)
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        return new

    def _leading_shape(self, sample_shape) -> torch.Size:
        return torch.Size(sample_shape) + self.batch_shape

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``value (..., batch, time, state)`` -> ``(...)`` broadcast with the batch shape."""
        return _broadcast_batch(self.log_prob_terms(value).sum(-1), self.batch_shape)


class ChainPrior(_ChainDistribution):
    """The generative model's distribution of a whole state path."""

    def __init__(self, prior, transition, batch: ChainBatch, state_dim: int, batch_shape=None):
        super().__init__(batch, state_dim, batch_shape)
        self.prior = prior
        self.transition = transition

    def log_prob_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(x_k), log p(x_k | previous))`` for every position, each ``(..., batch, time)``."""
        prior_lp = self.prior.distribution().log_prob(x)
        trans_lp = self.transition.distribution(previous_states(x, self.chain_batch)).log_prob(x)
        return prior_lp, trans_lp

    def log_prob_terms(self, x: torch.Tensor) -> torch.Tensor:
        b = self.chain_batch
        prior_lp, trans_lp = self.log_prob_parts(x)
        from_prior = b.first_mask() & ~b.carried_rows()[:, None]
        terms = torch.where(from_prior, prior_lp, trans_lp)
        return torch.where(b.mask(), terms, torch.zeros_like(terms))

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        """Ancestral sampling of every row's path: ``sample_shape + batch_shape + (time, state)``
        (positions before ``start`` are filler)."""
        b = self.chain_batch
        shape = self._leading_shape(sample_shape)
        from_prior = b.first_mask() & ~b.carried_rows()[:, None]
        use_x0 = b.first_mask() & b.carried_rows()[:, None]
        prior = self.prior.distribution()
        x_prev = prior.sample(shape)
        states = []
        for k in range(b.num_steps):
            if b.x0 is not None:
                x_prev = torch.where(use_x0[:, k : k + 1], b.x0.to(x_prev.dtype), x_prev)
            fresh = prior.sample(shape)
            moved = self.transition.distribution(x_prev).sample()
            x_prev = torch.where(from_prior[:, k : k + 1], fresh, moved)
            states.append(x_prev)
        return torch.stack(states, dim=-2)


class GuideChain(_ChainDistribution):
    """The variational posterior of a whole state path.

    Args:
        net: a :class:`~vmt.models.guide.GuideNet`.
        context: ``(batch, time, hidden)`` from ``net.context``.
        batch: the chains.
    """

    has_rsample = True
    use_lean_loop = True
    """Class switch: ``False`` makes the Gaussian guide step with :meth:`rsample_stepwise` (for
    benchmarks and tests of the lean loop)."""

    def __init__(self, net, context: torch.Tensor, batch: ChainBatch, batch_shape=None):
        super().__init__(batch, net.config.state_dim, batch_shape)
        self.net = net
        self.context = context
        self.first_loc, self.first_scale, self.first_combined = net.first_params(context)
        self.step_context = net.skip_context(context, 1)

    def step_distribution(self, loc, scale, combined) -> dist.TorchDistribution:
        """The guide's distribution of one state given its parameters (``first_params`` or
        ``step_params`` of the net): the net's own (:class:`vmt.models.parts.GuideStep`)."""
        return self.net.distribution(loc, scale, combined)

    def rsample(self, sample_shape=torch.Size()):
        """Sample paths ``sample_shape + batch_shape + (time, state)``.

        A guide network with a ``sample_path(chain, sample_shape)`` method samples the whole
        path itself (the affine guide's parallel scan, :mod:`vmt.models.scan`); the Gaussian
        :class:`~vmt.models.guide.GuideNet` takes the lean loop of
        :mod:`vmt.models.lean_loop` (same values and gradients as :meth:`rsample_stepwise`);
        every other guide steps with :meth:`rsample_stepwise`.
        """
        sample_path = getattr(self.net, "sample_path", None)
        if sample_path is not None:
            return sample_path(self, sample_shape)
        if self.use_lean_loop and lean_loop_applies(self.net):
            return lean_rsample(self, sample_shape)
        return self.rsample_stepwise(sample_shape)

    def rsample_stepwise(self, sample_shape=torch.Size()):
        """Sample paths ``sample_shape + batch_shape + (time, state)`` step by step with the
        guide network's ``step_params``; only the ``x``-dependent work is in the loop.

        The time axis of every precomputed tensor is unbound once (indexing ``[:, k]`` inside
        the loop would make each backward step write a gradient over the whole time axis),
        and the first-state selection is applied only at positions where some row starts.
        The Gaussian draw consumes the random stream exactly as ``Normal.rsample`` does.
        """
        b = self.chain_batch
        carried = b.carried_rows()[:, None]
        first = b.first_mask() & ~carried
        use_x0 = b.first_mask() & carried
        starts_at = first.any(0).tolist()
        x0_at = use_x0.any(0).tolist() if b.x0 is not None else [False] * b.num_steps
        step_context = self.step_context.unbind(1)
        first_loc, first_scale = self.first_loc.unbind(1), self.first_scale.unbind(1)
        first_combined = self.first_combined.unbind(1)
        structured = len(self.net.flows) > 0 or getattr(self.net, "tril_head", None) is not None
        x_prev = first_loc[0].new_zeros(self._leading_shape(sample_shape) + first_loc[0].shape[-1:])
        states = []
        for k in range(b.num_steps):
            if x0_at[k]:
                x_prev = torch.where(use_x0[:, k : k + 1], b.x0.to(x_prev.dtype), x_prev)
            loc, scale, combined = self.net.step_params(x_prev, step_context[k])
            if starts_at[k]:
                sel = first[:, k : k + 1]
                loc = torch.where(sel, first_loc[k], loc)
                scale = torch.where(sel, first_scale[k], scale)
                combined = torch.where(sel, first_combined[k], combined)
            if structured:
                x_prev = self.step_distribution(loc, scale, combined).rsample()
            else:
                x_prev = loc + torch.empty_like(loc).normal_() * scale
            states.append(x_prev)
        return torch.stack(states, dim=-2)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def position_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """The guide's conditional at every position given the path ``x (..., batch, time, state)``:
        batch shape ``(..., batch, time)``."""
        path_distribution = getattr(self.net, "path_distribution", None)
        if path_distribution is not None:
            return path_distribution(self, x)
        b = self.chain_batch
        first = (b.first_mask() & ~b.carried_rows()[:, None]).unsqueeze(-1)
        loc, scale, combined = self.net.step_params(previous_states(x, b), self.step_context)
        loc = torch.where(first, self.first_loc, loc)
        scale = torch.where(first, self.first_scale, scale)
        combined = torch.where(first, self.first_combined, combined)
        return self.step_distribution(loc, scale, combined)

    def log_prob_terms(self, x: torch.Tensor) -> torch.Tensor:
        terms = self.position_distribution(x).log_prob(x)
        return torch.where(self.chain_batch.mask(), terms, torch.zeros_like(terms))


class SequenceEmission(TorchDistribution):
    """``prod_k p(y_k | x_k)`` over each row's active positions.

    Batch shape ``x.shape[:-2]`` (``(..., batch)``); event shape ``(time,)`` for tokens,
    ``(time, obs)`` for vectors. Without observations in the batch (``obs=None``, prior
    predictive sampling) the event shape comes from the emission.

    Args:
        emission: the emission module (``distribution``, ``log_prob``, ``obs_shape``).
        x: ``(..., batch, time, state)`` states.
        batch: the chains.
    """

    arg_constraints: dict = {}

    def __init__(self, emission, x: torch.Tensor, batch: ChainBatch, batch_shape=None):
        self.emission = emission
        self.chain_batch = batch
        own = x.shape[:-2]
        if batch_shape is not None:
            batch_shape = _expanded_shape(own, batch_shape, "an emission")
            if batch_shape != own:  # the same tensor object otherwise (token scores are memoised by it)
                x = x.expand(batch_shape + x.shape[-2:])
        self.x = x
        event = (batch.num_steps, *emission.obs_shape)
        super().__init__(x.shape[:-2], torch.Size(event), validate_args=False)

    @property
    def support(self):
        if self.event_dim == 2:
            return constraints.independent(constraints.real, 2)
        return constraints.independent(constraints.nonnegative_integer, 1)

    def expand(self, batch_shape, _instance=None):
        return SequenceEmission(self.emission, self.x, self.chain_batch, batch_shape)

    def log_prob_terms(self, y: torch.Tensor) -> torch.Tensor:
        """``y (..., batch, time[, obs])`` -> ``(..., batch, time)``, zero at inactive positions."""
        mask = self.chain_batch.mask()
        y_safe = y if y.is_floating_point() else torch.where(mask, y, torch.zeros_like(y))
        terms = self.emission.log_prob(self.x, y_safe)
        return torch.where(mask, terms, torch.zeros_like(terms))

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        return _broadcast_batch(self.log_prob_terms(y).sum(-1), self.batch_shape)

    def sample(self, sample_shape=torch.Size()):
        """``sample_shape + batch_shape + event_shape`` observations drawn at every position."""
        with torch.no_grad():
            return self.emission.distribution(self.x).sample(sample_shape)
