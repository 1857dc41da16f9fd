"""Guide networks: ``q(x_1 | h_1, T)`` and the step/skip guide ``q(x_{k+t} | x_k, h_{k+1}, t, T)``.

Everything that depends only on the features ``h`` and the time inputs is computed for all
positions in one batched call (:meth:`GuideNet.context`); the sequential loop only pays for
the ``x``-dependent part (:meth:`GuideNet.step_params`): one ``state -> hidden`` and one
``hidden -> 2 * state`` matrix product per step.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.nn import functional as F

from vmt.models.config import VMTConfig
from vmt.models.flows import add_couplings, coupling_transforms
from vmt.models.pyro_module import LocalParamsModule


def feature_context(net, features: torch.Tensor, ahead: torch.Tensor,
                    source: torch.Tensor | None = None) -> torch.Tensor:
    """``W_h h + w_T log(1 + T) / log(1 + T_max)`` of a guide ``net`` (with ``config``,
    ``feature_proj`` and ``ahead_proj``): ``features (source, time, feature)``, ``ahead
    (batch, time)``, ``source (batch,)`` -> ``(batch, time, hidden)``."""
    if features.dim() != 3 or features.shape[-1] != net.config.feature_dim:
        raise ValueError(
            f"features must be (source, time, {net.config.feature_dim}), got {tuple(features.shape)}"
        )
    projected = net.feature_proj(features)
    if source is not None:
        projected = projected[source]
    projected = projected[:, : ahead.shape[1]]
    tau = torch.log1p(ahead.to(projected.dtype)) / math.log1p(net.config.max_window)
    return projected + net.ahead_proj(tau.unsqueeze(-1))


class GuideNet(LocalParamsModule):
    """Combiner-style guide (after Krishnan et al.'s deep Markov model), with time inputs.

    ``T`` (tokens still ahead in the window) enters as ``log(1 + T) / log(1 + max_window)``;
    the skip ``t`` as ``log(t) / log(max_skip)``.
    """

    reads_tokens = False

    def __init__(self, config: VMTConfig):
        super().__init__()
        d, f, h = config.state_dim, config.feature_dim, config.guide_hidden
        self.config = config
        self.feature_proj = nn.Linear(f, h)
        self.ahead_proj = nn.Linear(1, h, bias=False)
        self.skip_proj = nn.Linear(1, h, bias=False)
        self.first_head = nn.Linear(h, 2 * d)
        self.state_proj = nn.Linear(d, h)
        self.step_head = nn.Linear(h, 2 * d)
        self.state_skip = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.state_skip.weight)
        self.min_scale = config.min_scale
        add_couplings(self, "flows", (
            T.conditional_affine_coupling(d, context_dim=h, hidden_dims=[h])
            for _ in range(config.flow_layers if config.guide == "flow" else 0)
        ), d)
        # full-covariance step: the strictly lower part of a unit-triangular factor, read from
        # the combiner; zero at the start, so the guide starts as the diagonal one
        self.tril_head = nn.Linear(h, d * (d - 1) // 2) if config.guide == "full" else None
        if self.tril_head is not None:
            nn.init.zeros_(self.tril_head.weight)
            nn.init.zeros_(self.tril_head.bias)

    def context(
        self, features: torch.Tensor, ahead: torch.Tensor, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feature part of the guide for every position.

        Args:
            features: ``(source, time, feature)``.
            ahead: ``(batch, time)`` tokens still ahead, ``>= 1``.
            source: ``(batch,)`` row of ``features`` each chain reads (``None``: identity).

        Returns:
            ``(batch, time, hidden)``.
        """
        return feature_context(self, features, ahead, source)

    def skip_context(self, context: torch.Tensor, skip: torch.Tensor | int) -> torch.Tensor:
        """``tanh(context + e(t))``: ``context (..., hidden)``, ``skip`` int or ``(...)``."""
        skip = torch.as_tensor(skip, dtype=context.dtype, device=context.device)
        s = torch.log(skip) / math.log(max(self.config.max_skip, 2))
        return torch.tanh(context + self.skip_proj(s.expand(context.shape[:-1]).unsqueeze(-1)))

    def with_target(self, skip_context: torch.Tensor, target_context: torch.Tensor) -> torch.Tensor:
        """The skip context for a step that lands on a position with ``target_context``.

        This guide reads nothing of the target position beyond the features it started from:
        ``skip_context`` is returned unchanged (guides that read tokens override this; the
        sequential reader calls it only for guides with ``reads_tokens``).
        """
        return skip_context

    def _loc_scale(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = raw.chunk(2, dim=-1)
        return loc, F.softplus(scale) + self.min_scale

    def first_params(self, context: torch.Tensor):
        """``q(x_1 | h_1, T)`` from ``context (..., hidden)``: ``(loc, scale, combined)``."""
        combined = torch.tanh(context)
        loc, scale = self._loc_scale(self.first_head(combined))
        return loc, scale, combined

    def step_params(self, x_prev: torch.Tensor, skip_context: torch.Tensor, skip: int = 1):
        """``q(x_{k+t} | x_k, ...)`` from ``x_prev (..., state)`` and :meth:`skip_context`
        (``skip`` is ``t``; this guide reads it from the context only)."""
        combined = 0.5 * (torch.tanh(self.state_proj(x_prev)) + skip_context)
        loc, scale = self._loc_scale(self.step_head(combined))
        return loc + self.state_skip(x_prev), scale, combined

    def scale_tril(self, scale: torch.Tensor, combined: torch.Tensor) -> torch.Tensor | None:
        """The Cholesky factor ``L = (I + M) diag(scale)`` of a full-covariance guide step.

        ``M`` is strictly lower-triangular, read from the combiner output, so the covariance
        ``L L^T`` is any positive-definite matrix while ``scale`` stays the conditional
        standard deviation of the first coordinate.

        Args:
            scale: ``(..., state)`` positive scales (from :meth:`first_params` /
                :meth:`step_params`).
            combined: ``(..., hidden)`` combiner output of the same positions.

        Returns:
            ``(..., state, state)`` lower-triangular with diagonal ``scale``, or ``None`` for
            a diagonal (``"gaussian"`` / ``"flow"``) guide.
        """
        if self.tril_head is None:
            return None
        d = self.config.state_dim
        if scale.shape[-1] != d or combined.shape[:-1] != scale.shape[:-1]:
            raise ValueError(f"scale must be (..., {d}) with combined (same ..., hidden); got "
                             f"{tuple(scale.shape)} and {tuple(combined.shape)}")
        rows, cols = torch.tril_indices(d, d, -1, device=scale.device)
        lower = scale.new_zeros(*scale.shape, d)
        lower[..., rows, cols] = self.tril_head(combined)
        return lower * scale.unsqueeze(-2) + torch.diag_embed(scale)

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor, combined: torch.Tensor):
        """The guide's conditional of one state, event ``(state,)``, from ``loc``/``scale``
        ``(..., state)`` and ``combined (..., hidden)``: a diagonal Gaussian, a full-covariance
        Gaussian (``guide="full"``) or a diagonal Gaussian pushed through the flow."""
        tril = self.scale_tril(scale, combined)
        if tril is not None:
            return dist.MultivariateNormal(loc, scale_tril=tril)
        base = dist.Normal(loc, scale).to_event(1)
        transforms = self.flow_transforms(combined)
        return dist.TransformedDistribution(base, transforms) if transforms else base

    def flow_transforms(self, combined: torch.Tensor) -> list:
        """Coupling transforms conditioned on the combiner output (empty for a Gaussian guide)."""
        return coupling_transforms(self, self.flows, combined)
