"""The affine-in-state guide, whose path is sampled by a parallel (associative) scan.

The guide step is Gaussian with a mean affine in the previous state::

    q(x_k | x_{k-1}, h_k) = N(A_k x_{k-1} + b_k, L_k L_k^T),    (A_k, b_k, L_k) = f(h_k, T_k)

with ``A_k, b_k, L_k`` computed from the features for every position in one batched call
(:meth:`AffineGuideNet.affine_params`). With the standard-normal draws ``eps_k`` taken up
front, a sampled path is the affine recursion ``x_k = A_k x_{k-1} + c_k``,
``c_k = b_k + L_k eps_k``, and affine maps compose associatively::

    (A_2, c_2) o (A_1, c_1) = (A_2 A_1, A_2 c_1 + c_2)

so :func:`affine_scan` computes every ``x_k`` in ``O(log time)`` sequential depth and
``O(time)`` work. Scoring a given path needs no scan: the residuals ``x_k - A_k x_{k-1} - b_k``
of all positions are whitened at once (:meth:`AffineGuideNet.path_distribution`).

Two structures (``VMTConfig.affine_structure``):

* ``"diagonal"``: ``A_k`` and ``L_k`` diagonal; the scan is elementwise, ``O(state)`` per
  position, so it stays cheap for large states;
* ``"full"``: ``A_k`` a full ``(state, state)`` matrix and ``L_k`` a lower-triangular
  Cholesky factor (full covariance); the scan multiplies ``(state, state)`` matrices. This
  family contains the exact smoothing posterior of a linear-Gaussian state-space model.

The first state of a row is drawn from ``q(x_1 | h_1, T)`` (a diagonal Gaussian, as in
:class:`~vmt.models.guide.GuideNet`); a carried row's first state is the affine step out of
its carried ``x0``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from vmt.models.config import VMTConfig
from vmt.models.guide import feature_context
from vmt.models.pyro_module import LocalParamsModule

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def apply_affine(matrix: torch.Tensor, x: torch.Tensor, full: bool) -> torch.Tensor:
    """``A x`` for ``matrix (..., state)`` (diagonal, ``full=False``) or ``(..., state,
    state)`` and ``x (..., state)``; leading dimensions broadcast."""
    if not full:
        return matrix * x
    return (matrix @ x.unsqueeze(-1)).squeeze(-1)


def _check_scan_inputs(matrix: torch.Tensor, offset: torch.Tensor) -> None:
    if offset.dim() < 2:
        raise ValueError(f"offset must be (..., time, state), got {tuple(offset.shape)}")
    diag_ok = matrix.shape == offset.shape
    full_ok = matrix.shape == offset.shape + offset.shape[-1:]
    if not (diag_ok or full_ok):
        raise ValueError(
            f"matrix must be (..., time, state) or (..., time, state, state) matching offset "
            f"{tuple(offset.shape)}, got {tuple(matrix.shape)}"
        )


def _scan_time_first(matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The recursion on ``(time, ...)`` tensors (time first), ``time`` even or odd.

    Pairs ``(2i, 2i+1)`` are composed into one map from ``x_{2i-1}`` to ``x_{2i+1}``; the
    half-length recursion gives the odd positions and one affine step each fills in the even
    ones. ``time - 1`` compositions in all, ``2 log2(time)`` sequential levels. Positions are
    taken apart with ``split`` / ``unbind`` and put together with ``cat`` / ``stack`` (whose
    backward passes copy, where strided slicing would zero-fill a whole tensor per slice).
    """
    n = offset.shape[0]
    if n == 1:
        return offset
    if n % 2:  # pad with the map x -> 0 (A = 0, c = 0); its output is dropped
        matrix = torch.cat([matrix, matrix.new_zeros((1,) + matrix.shape[1:])])
        offset = torch.cat([offset, offset.new_zeros((1,) + offset.shape[1:])])
    m = matrix.shape[0] // 2
    full = matrix.dim() > offset.dim()
    a_even, a_odd = matrix.unflatten(0, (m, 2)).unbind(1)
    c_even, c_odd = offset.unflatten(0, (m, 2)).unbind(1)
    pair_matrix = a_odd @ a_even if full else a_odd * a_even
    pair_offset = apply_affine(a_odd, c_even, full) + c_odd
    x_odd = _scan_time_first(pair_matrix, pair_offset)  # positions 1, 3, ..., 2m - 1
    if m > 1:  # x_{2i} = A_{2i} x_{2i-1} + c_{2i} for i >= 1
        c_first, c_later = c_even.split([1, m - 1])
        x_later = apply_affine(a_even.split([1, m - 1])[1], x_odd.split([m - 1, 1])[0], full) + c_later
        x_even = torch.cat([c_first, x_later])
    else:
        x_even = c_even
    woven = torch.stack([x_even, x_odd], dim=1).flatten(0, 1)
    return woven if n == 2 * m else woven.split([n, 1])[0]


def affine_scan(matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Every state of ``x_k = A_k x_{k-1} + c_k`` with ``x_{-1} = 0`` (so ``x_0 = c_0``).

    Args:
        matrix: ``(..., time, state)`` diagonal ``A_k`` or ``(..., time, state, state)``.
        offset: ``(..., time, state)`` the ``c_k``.

    Returns:
        ``(..., time, state)``, by a parallel scan (``O(log time)`` sequential depth),
        differentiable in both inputs.
    """
    _check_scan_inputs(matrix, offset)
    t_axis = offset.dim() - 2
    x = _scan_time_first(matrix.movedim(t_axis, 0), offset.movedim(t_axis, 0))
    return x.movedim(0, t_axis)


def affine_loop(matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The same recursion as :func:`affine_scan`, one position at a time (a reference)."""
    _check_scan_inputs(matrix, offset)
    t_axis = offset.dim() - 2
    full = matrix.dim() > offset.dim()
    x = offset.select(t_axis, 0)
    states = [x]
    for k in range(1, offset.shape[t_axis]):
        x = apply_affine(matrix.select(t_axis, k), x, full) + offset.select(t_axis, k)
        states.append(x)
    return torch.stack(states, dim=t_axis)


class AffineNormal:
    """A Gaussian with event ``(state,)``: diagonal ``scale (..., state)`` or (``full``)
    lower-triangular ``scale (..., state, state)``; lean (no distribution-object validation)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, full: bool):
        self.loc, self.scale, self.full = loc, scale, full

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """``L^{-1} (x - loc)``: ``(..., state)``."""
        r = x - self.loc
        if not self.full:
            return r / self.scale
        return torch.linalg.solve_triangular(self.scale, r.unsqueeze(-1), upper=False).squeeze(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(...)``."""
        z = self.whiten(x)
        diag = self.scale.diagonal(dim1=-2, dim2=-1) if self.full else self.scale
        return -(0.5 * z * z + diag.log()).sum(-1) - z.shape[-1] * _HALF_LOG_2PI

    def sample(self) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample()

    def rsample(self) -> torch.Tensor:
        eps = torch.empty_like(self.loc).normal_()
        return self.loc + apply_affine(self.scale, eps, self.full)

    def to_pyro(self) -> dist.TorchDistribution:
        """The same Gaussian as a Pyro distribution."""
        if not self.full:
            return dist.Normal(self.loc, self.scale).to_event(1)
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale)


class AffineGuideNet(LocalParamsModule):
    """``q(x_{k+t} | x_k, h_{k+1}, t, T) = N(A x_k + b, L L^T)`` with ``(A, b, L)`` from the
    features alone (a structured inference network linear in the state).

    The feature side is :class:`~vmt.models.guide.GuideNet`'s: ``c = W_h h + w_T tau(T) +
    w_t s(t)``, then one linear head of ``tanh(c)`` gives, in information form (see
    :meth:`affine_params`), a coupling ``K`` (``state`` or ``state^2`` numbers), a shift ``m``
    (with a linear path from ``c``) and a precision factor (``state`` or ``state (state + 1) /
    2`` numbers). ``K`` and the linear path start at zero (no dependence on the previous state),
    like the gated guide's linear skip.
    """

    reads_tokens = False

    def __init__(self, config: VMTConfig):
        super().__init__()
        d, f, h = config.state_dim, config.feature_dim, config.guide_hidden
        self.config = config
        self.full = config.affine_structure == "full"
        self.state_dim = d
        self.feature_proj = nn.Linear(f, h)
        self.ahead_proj = nn.Linear(1, h, bias=False)
        self.skip_proj = nn.Linear(1, h, bias=False)
        self.n_matrix = d * d if self.full else d
        self.n_scale = d * (d + 1) // 2 if self.full else d
        self.first_head = nn.Linear(h, d + self.n_scale)
        self.affine_head = nn.Linear(h, self.n_matrix + d + self.n_scale)
        self.offset_skip = nn.Linear(h, d, bias=False)
        self.first_skip = nn.Linear(h, d, bias=False)
        with torch.no_grad():
            self.affine_head.weight[: self.n_matrix].zero_()
            self.affine_head.bias[: self.n_matrix].zero_()
            self.offset_skip.weight.zero_()
            self.first_skip.weight.zero_()
        self.hidden = h
        self.min_scale = config.min_scale
        if self.full:
            rows, cols = torch.tril_indices(d, d)
            self.register_buffer("tril_flat", rows * d + cols, persistent=False)
            self.register_buffer("diag_of_tril", (rows == cols).nonzero().squeeze(-1), persistent=False)

    def context(self, features: torch.Tensor, ahead: torch.Tensor,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, time, hidden)``, as :meth:`vmt.models.guide.GuideNet.context`."""
        return feature_context(self, features, ahead, source)

    def skip_context(self, context: torch.Tensor, skip: torch.Tensor | int) -> torch.Tensor:
        """``[tanh(c), c]`` with ``c = context + e(t)``: ``context (..., hidden)``, ``skip`` int
        or ``(...)`` -> ``(..., 2 hidden)`` (the linear half feeds ``b``'s linear path)."""
        skip = torch.as_tensor(skip, dtype=context.dtype, device=context.device)
        s = torch.log(skip) / math.log(max(self.config.max_skip, 2))
        c = context + self.skip_proj(s.expand(context.shape[:-1]).unsqueeze(-1))
        return torch.cat([torch.tanh(c), c], dim=-1)

    def with_target(self, skip_context: torch.Tensor, target_context: torch.Tensor) -> torch.Tensor:
        """Unchanged: this guide reads nothing of the target position."""
        return skip_context

    def first_params(self, context: torch.Tensor):
        """``q(x_1 | h_1, T)`` from ``context (..., hidden)`` (from :meth:`context`):
        ``(loc, scale, combined)`` with ``scale`` shaped like the steps' (``(..., state)``, or
        a lower-triangular ``(..., state, state)`` covariance factor when full).

        Information form, as the steps: precision ``P`` and shift ``m`` (with a linear path
        from the context), ``loc = P^{-1} m``."""
        combined = torch.tanh(context)
        m, raw = self.first_head(combined).split([self.state_dim, self.n_scale], dim=-1)
        m = m + self.first_skip(context)
        loc, scale = self._moments(m.unsqueeze(-1), raw)
        return loc.squeeze(-1), scale, combined

    def _moments(self, natural: torch.Tensor, raw: torch.Tensor):
        """``(P^{-1} natural, covariance factor)`` from ``natural (..., state, k)`` and the raw
        precision factor ``raw (..., n_scale)``.

        Diagonal: ``P = diag(1 / s^2)`` with ``s = softplus(raw) + min_scale`` (``s`` is the
        scale, floored as every Gaussian scale of the library). Full: ``P = U U^T`` with ``U``
        lower-triangular, diagonal ``1 / s``, free entries below; the covariance factor
        returned is the lower Cholesky factor of ``P^{-1}``.
        """
        if not self.full:
            s = F.softplus(raw) + self.min_scale
            return (s * s).unsqueeze(-1) * natural, s
        d = self.state_dim
        lead = raw.shape[:-1]
        diag = 1.0 / (F.softplus(raw[..., self.diag_of_tril]) + self.min_scale)
        raw = raw.index_copy(-1, self.diag_of_tril, diag)
        u = raw.new_zeros(lead + (d * d,)).index_copy(-1, self.tril_flat, raw).reshape(lead + (d, d))
        covariance = torch.cholesky_inverse(u)
        return torch.cholesky_solve(natural, u), torch.linalg.cholesky(covariance)

    def affine_params(self, skip_context: torch.Tensor):
        """``(A, b, L)`` from ``skip_context (..., 2 hidden)``: ``A (..., state)`` or ``(...,
        state, state)``, ``b (..., state)``, ``L`` shaped like ``A`` (the covariance's lower
        Cholesky factor when full, the scales when diagonal).

        Information form: a linear head of ``tanh(c)`` gives a precision ``P``, a coupling
        ``K`` and a shift ``m`` (which also has a linear path from ``c``), and
        ``q(x_k | x_{k-1}) \u221d exp(-x_k^T P x_k / 2 + (K x_{k-1} + m)^T x_k)``, i.e.
        ``A = P^{-1} K``, ``b = P^{-1} m``, ``L L^T = P^{-1}``. The exact posterior of a
        linear-Gaussian model has this form with ``K = Q^{-1} A_model`` and ``m`` linear in a
        backward message, its dependence on the position (``T``) only through ``P``.
        """
        d, h = self.state_dim, self.hidden
        squashed, linear = skip_context.split([h, h], dim=-1)
        raw = self.affine_head(squashed)
        k, m, s = raw.split([self.n_matrix, d, self.n_scale], dim=-1)
        m = m + self.offset_skip(linear)
        if self.full:
            natural = torch.cat([k.reshape(raw.shape[:-1] + (d, d)), m.unsqueeze(-1)], dim=-1)
            solved, tril = self._moments(natural, s)
            a, b = solved.split([d, 1], dim=-1)
            return a, b.squeeze(-1), tril
        scale = F.softplus(s) + self.min_scale  # as in _moments, without stacking k and m
        variance = scale * scale
        return variance * k, variance * m, scale

    def step_params(self, x_prev: torch.Tensor, skip_context: torch.Tensor, skip: int = 1):
        """``(loc, scale, combined)`` of one step from ``x_prev (..., state)``: ``loc = A x + b``
        and ``scale = L`` (``(..., state)`` or ``(..., state, state)``)."""
        a, b, tril = self.affine_params(skip_context)
        return apply_affine(a, x_prev, self.full) + b, tril, skip_context

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor, combined: torch.Tensor):
        """One step, event ``(state,)``: a full-covariance Gaussian when ``scale`` is a
        Cholesky factor ``(..., state, state)``, else a diagonal one."""
        if scale.dim() > loc.dim():
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)

    def flow_transforms(self, combined: torch.Tensor) -> list:
        return []

    # -- whole paths (used by GuideChain) --------------------------------------------------
    def _chain_params(self, chain):
        """``affine_params`` of every position of ``chain``, computed once per chain and
        autograd mode (sampling and scoring a path share them)."""
        key = "_affine_params_grad" if torch.is_grad_enabled() else "_affine_params"
        params = chain.__dict__.get(key)
        if params is None:
            params = self.affine_params(chain.step_context)
            chain.__dict__[key] = params
        return params

    def _selections(self, chain):
        b = chain.chain_batch
        carried = b.carried_rows()[:, None]
        first = (b.first_mask() & ~carried).unsqueeze(-1)
        use_x0 = (b.first_mask() & carried).unsqueeze(-1)
        before = (b.positions() < b.start[:, None]).unsqueeze(-1)
        return first, use_x0, before

    def sample_path(self, chain, sample_shape=torch.Size()) -> torch.Tensor:
        """A path ``sample_shape + batch_shape + (time, state)`` of ``chain`` (a
        :class:`~vmt.models.chain.GuideChain` with this net), by :func:`affine_scan`.

        One ``(..., batch, time, state)`` standard-normal block is drawn up front. A row's
        first position takes ``q(x_1 | .)``'s draw (uncarried) or the step out of ``x0``
        (carried); positions before a row's start are zero.
        """
        b = chain.chain_batch
        lead = torch.Size(sample_shape) + chain.batch_shape
        a, bias, tril = self._chain_params(chain)
        eps = torch.empty(lead + (b.num_steps, self.state_dim), dtype=bias.dtype,
                          device=bias.device).normal_()
        offset = bias + apply_affine(tril, eps, self.full)
        first, use_x0, before = self._selections(chain)
        starts = first.any(-1).any(0)  # positions where some row starts afresh
        if bool(starts.all()):
            first_draw = chain.first_loc + apply_affine(chain.first_scale, eps, self.full)
        else:  # only the positions where rows start (typically position 0 alone)
            where = starts.nonzero().squeeze(-1)
            first_draw = offset.index_copy(-2, where, chain.first_loc.index_select(1, where)
                                           + apply_affine(chain.first_scale.index_select(1, where),
                                                          eps.index_select(-2, where), self.full))
        offset = torch.where(first, first_draw, offset)
        if b.x0 is not None:
            from_x0 = apply_affine(a, b.x0[:, None, :].to(bias.dtype), self.full) + offset
            offset = torch.where(use_x0, from_x0, offset)
        if bool(before.any()):
            offset = torch.where(before, torch.zeros_like(offset), offset)
        # rows restart at their first position: cut the dependence on what precedes it
        cut = first | use_x0 | before
        cut = cut.unsqueeze(-1) if self.full else cut
        a = torch.where(cut, torch.zeros_like(a), a)
        return affine_scan(a.expand(lead + a.shape[1:]), offset)

    def path_distribution(self, chain, x: torch.Tensor) -> AffineNormal:
        """The guide's conditional at every position of ``x (..., batch, time, state)``
        (batch shape ``(..., batch, time)``), all positions at once."""
        from vmt.models.chain import previous_states

        first, _, _ = self._selections(chain)
        a, bias, tril = self._chain_params(chain)
        loc = apply_affine(a, previous_states(x, chain.chain_batch), self.full) + bias
        loc = torch.where(first, chain.first_loc, loc)
        scale = torch.where(first.unsqueeze(-1) if self.full else first, chain.first_scale, tril)
        return AffineNormal(loc, scale, self.full)
