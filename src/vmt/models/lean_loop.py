"""A lean sequential sampling loop for the gated Gaussian guide (:class:`~vmt.models.guide.GuideNet`).

The guide step is nonlinear in the previous state, so its path is sampled one position at a
time. What the loop must pay per step is only the ``x``-dependent work; everything else is
computed for all positions in one batched call before it:

* the combiner's context half goes through the step head up front:
  ``pre_k = 0.5 W_head tanh(h_k) + b_head`` for every ``k`` (``(..., batch, time, 2 state)``);
* the two maps of the previous state (``state -> hidden`` of the combiner and the linear skip
  ``state -> state``) are one fused ``addmm`` with the concatenated weights;
* the head of the state half is one ``addmm`` onto ``pre_k``;
* no distribution objects, and the first-state and carried-state selections only at
  positions where some row needs them;
* the loop records nothing for autograd: its backward pass is written out
  (:class:`_LeanLoop`), two matrix products per step in reverse, with the weight gradients
  formed afterwards in one product over all steps.

Per step: ``u = [W_s; W_skip] x + [b_s; 0]``, ``raw = pre_k + 0.5 W_head tanh(u_h)``,
``loc = raw_loc + u_skip``, ``scale = softplus(raw_scale) + min_scale``,
``x = loc + scale * eps`` — the same function as
:meth:`~vmt.models.chain.GuideChain.rsample_stepwise` (values and gradients equal up to
rounding), drawing the noise in the same order and shapes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vmt.models.guide import GuideNet


def lean_loop_applies(net) -> bool:
    """Whether :func:`lean_rsample` can sample for ``net``: a diagonal Gaussian :class:`GuideNet`
    (no flow, no full-covariance factor)."""
    return type(net) is GuideNet and len(net.flows) == 0 and getattr(net, "tril_head", None) is None


def lean_rsample(chain, sample_shape=torch.Size()) -> torch.Tensor:
    """Paths ``sample_shape + batch_shape + (time, state)`` of a
    :class:`~vmt.models.chain.GuideChain` whose net is a Gaussian :class:`GuideNet`."""
    net = chain.net
    if not lean_loop_applies(net):
        raise ValueError(f"the lean loop needs a diagonal Gaussian GuideNet (no flow, no full covariance), "
                         f"got {type(net).__name__} with guide {net.config.guide!r}")
    b = chain.chain_batch
    lead = torch.Size(sample_shape) + chain.batch_shape
    rows, steps, d = lead.numel(), b.num_steps, net.config.state_dim
    carried = b.carried_rows()[:, None]
    first = b.first_mask() & ~carried
    use_x0 = b.first_mask() & carried

    def per_row(t: torch.Tensor) -> torch.Tensor:  # (batch, ...) -> (rows, ...) over the leading dims
        return t if len(lead) == 1 else t.expand(lead + t.shape[1:]).reshape((rows,) + t.shape[1:])

    # everything x-independent, for all positions at once
    head_w = net.step_head.weight  # (2 state, hidden)
    pre = F.linear(0.5 * chain.step_context, head_w, net.step_head.bias)  # (batch, time, 2 state)
    fused_w = torch.cat([net.state_proj.weight, net.state_skip.weight]).T  # (state, hidden + state)
    fused_b = torch.cat([net.state_proj.bias, net.state_proj.bias.new_zeros(d)])
    x0 = per_row(b.x0.to(pre.dtype)) if b.x0 is not None else pre.new_zeros(rows, d)
    plan = _Plan(per_row(first), per_row(use_x0), first.any(0).tolist(),
                 use_x0.any(0).tolist() if b.x0 is not None else [False] * steps, net.min_scale)
    states = _LeanLoop.apply(per_row(pre), fused_w, fused_b, 0.5 * head_w.T,
                             per_row(chain.first_loc), per_row(chain.first_scale), x0, plan)
    return states.view(lead + (steps, d))


class _Plan:
    """Where rows start (``first (rows, time)``), where they continue from ``x0``
    (``use_x0 (rows, time)``), the positions where either happens, and the scale floor."""

    def __init__(self, first, use_x0, starts_at, x0_at, min_scale):
        self.first, self.use_x0 = first, use_x0
        self.starts_at, self.x0_at, self.min_scale = starts_at, x0_at, min_scale


class _LeanLoop(torch.autograd.Function):
    """The sampling loop with a hand-written backward pass (backpropagation through time).

    Forward, per step ``k`` (rows ``N``, hidden ``H``, state ``D``)::

        u = x W + c                          (N, H + D)   W = [W_s; W_skip]^T, c = [b_s; 0]
        t = tanh(u[:, :H]);  raw = pre_k + t V        V = W_head^T / 2
        loc = raw[:, :D] + u[:, H:];  scale = softplus(raw[:, D:]) + min_scale
        x = loc + eps * scale                 (first / carried selections where rows start)

    Nothing is recorded for autograd inside the loop; the backward pass runs the loop in
    reverse with two matrix products per step and forms the weight gradients afterwards as one
    product over all steps. Inputs: ``pre (N, time, 2D)``, ``W (D, H + D)``, ``c (H + D,)``,
    ``V (H, 2D)``, ``first_loc``, ``first_scale (N, time, D)``, ``x0 (N, D)``.
    """

    @staticmethod
    def forward(ctx, pre, fused_w, fused_b, half_head, first_loc, first_scale, x0, plan):
        rows, steps, _ = pre.shape
        h, d = half_head.shape[0], first_loc.shape[-1]
        xs_prev = pre.new_empty(steps, rows, d)
        tanhs = pre.new_empty(steps, rows, h)
        slopes = pre.new_empty(steps, rows, d)  # sigmoid(raw_scale): softplus' derivative
        noises = pre.new_empty(steps, rows, d)
        states = pre.new_empty(rows, steps, d)
        x = pre.new_zeros(rows, d)
        for k in range(steps):
            if plan.x0_at[k]:
                x = torch.where(plan.use_x0[:, k : k + 1], x0, x)
            xs_prev[k] = x
            u = torch.addmm(fused_b, x, fused_w)
            t = torch.tanh(u[:, :h], out=tanhs[k])
            raw = torch.addmm(pre[:, k], t, half_head)
            loc = raw[:, :d] + u[:, h:]
            raw_scale = raw[:, d:]
            torch.sigmoid(raw_scale, out=slopes[k])
            scale = F.softplus(raw_scale) + plan.min_scale
            if plan.starts_at[k]:
                sel = plan.first[:, k : k + 1]
                loc = torch.where(sel, first_loc[:, k], loc)
                scale = torch.where(sel, first_scale[:, k], scale)
            noise = torch.empty_like(loc).normal_()
            noises[k] = noise
            x = torch.addcmul(loc, noise, scale)
            states[:, k] = x
        ctx.save_for_backward(fused_w, half_head, xs_prev, tanhs, slopes, noises)
        ctx.plan = plan
        return states

    @staticmethod
    def backward(ctx, g_states):
        fused_w, half_head, xs_prev, tanhs, slopes, noises = ctx.saved_tensors
        plan = ctx.plan
        steps, rows, d = xs_prev.shape
        h = half_head.shape[0]
        g_raw_all = g_states.new_empty(steps, rows, 2 * d)
        g_u_all = g_states.new_empty(steps, rows, h + d)
        g_first_loc = g_states.new_zeros(rows, steps, d)
        g_first_scale = g_states.new_zeros(rows, steps, d)
        g_x0 = g_states.new_zeros(rows, d)
        head_t, fused_t = half_head.T, fused_w.T
        carry = None
        for k in range(steps - 1, -1, -1):
            g_loc = g_states[:, k] if carry is None else g_states[:, k] + carry
            g_scale = g_loc * noises[k]
            if plan.starts_at[k]:
                sel = plan.first[:, k : k + 1]
                g_first_loc[:, k] = torch.where(sel, g_loc, 0.0)
                g_first_scale[:, k] = torch.where(sel, g_scale, 0.0)
                g_loc = torch.where(sel, 0.0, g_loc)
                g_scale = torch.where(sel, 0.0, g_scale)
            g_raw = g_raw_all[k]
            g_raw[:, :d] = g_loc
            torch.mul(g_scale, slopes[k], out=g_raw[:, d:])
            g_u = g_u_all[k]
            t = tanhs[k]
            torch.mul(g_raw @ head_t, 1 - t * t, out=g_u[:, :h])
            g_u[:, h:] = g_loc
            carry = g_u @ fused_t
            if plan.x0_at[k]:
                use = plan.use_x0[:, k : k + 1]
                g_x0 += torch.where(use, carry, 0.0)
                carry = torch.where(use, 0.0, carry)
        flat_u = g_u_all.reshape(steps * rows, h + d)
        g_fused_w = xs_prev.reshape(steps * rows, d).T @ flat_u
        g_half_head = tanhs.reshape(steps * rows, h).T @ g_raw_all.reshape(steps * rows, 2 * d)
        return (g_raw_all.transpose(0, 1), g_fused_w, flat_u.sum(0), g_half_head,
                g_first_loc, g_first_scale, g_x0, None)
