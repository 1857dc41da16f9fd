"""A lean sequential sampling loop for the gated Gaussian guide (:class:`~vmt.models.guide.GuideNet`).

The guide step is nonlinear in the previous state, so its path is sampled one position at a
time. What the loop must pay per step is only the ``x``-dependent work; everything else is
computed for all positions in one batched call before it:

* the combiner's context half goes through the step head up front:
  ``pre_k = 0.5 W_head tanh(h_k) + b_head`` for every ``k`` (``(..., batch, time, 2 state)``);
* the two maps of the previous state (``state -> hidden`` of the combiner and the linear skip
  ``state -> state``) are one fused ``addmm`` with the concatenated weights;
* the head of the state half is one ``addmm`` onto ``pre_k``;
* no distribution objects, no indexing into the time axis (it is unbound once), and the
  first-state and carried-state selections only at positions where some row needs them.

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
    """Whether :func:`lean_rsample` can sample for ``net``: a Gaussian :class:`GuideNet`."""
    return type(net) is GuideNet and len(net.flows) == 0


def lean_rsample(chain, sample_shape=torch.Size()) -> torch.Tensor:
    """Paths ``sample_shape + batch_shape + (time, state)`` of a
    :class:`~vmt.models.chain.GuideChain` whose net is a Gaussian :class:`GuideNet`."""
    net = chain.net
    if not lean_loop_applies(net):
        raise ValueError(f"the lean loop needs a Gaussian GuideNet without flows, got {type(net).__name__}")
    b = chain.chain_batch
    lead = torch.Size(sample_shape) + chain.batch_shape
    d, h = net.config.state_dim, net.config.guide_hidden
    carried = b.carried_rows()[:, None]
    first = b.first_mask() & ~carried
    use_x0 = b.first_mask() & carried
    starts_at = first.any(0).tolist()
    x0_at = use_x0.any(0).tolist() if b.x0 is not None else [False] * b.num_steps
    # everything x-independent, for all positions at once
    head_w = net.step_head.weight  # (2 state, hidden)
    pre = F.linear(0.5 * chain.step_context, head_w, net.step_head.bias)  # (batch, time, 2 state)
    rows = lead.numel()
    if len(lead) > 1:
        pre = pre.expand(lead + pre.shape[-2:]).reshape(rows, *pre.shape[-2:])
    pre = pre.unbind(1)
    half_head = 0.5 * head_w.T  # (hidden, 2 state)
    fused_w = torch.cat([net.state_proj.weight, net.state_skip.weight]).T  # (state, hidden + state)
    fused_b = torch.cat([net.state_proj.bias, net.state_proj.bias.new_zeros(d)])
    first_loc, first_scale = chain.first_loc.unbind(1), chain.first_scale.unbind(1)
    min_scale = net.min_scale
    x = first_loc[0].new_zeros(rows, d)
    flat = (rows, d)

    def select(mask_k, value_k, current):
        # mask_k (batch, 1) and value_k (batch, state) broadcast over the leading dims
        return torch.where(mask_k, value_k, current.view(lead + (d,))).reshape(flat)

    states = []
    for k in range(b.num_steps):
        if x0_at[k]:
            x = select(use_x0[:, k : k + 1], b.x0.to(x.dtype), x)
        u = torch.addmm(fused_b, x, fused_w)
        raw = torch.addmm(pre[k], torch.tanh(u[:, :h]), half_head)
        loc = raw[:, :d] + u[:, h:]
        scale = F.softplus(raw[:, d:]) + min_scale
        if starts_at[k]:
            sel = first[:, k : k + 1]
            loc = select(sel, first_loc[k], loc)
            scale = select(sel, first_scale[k], scale)
        x = torch.addcmul(loc, torch.empty_like(loc).normal_(), scale)
        states.append(x)
    return torch.stack(states, dim=-2).view(lead + (b.num_steps, d))
