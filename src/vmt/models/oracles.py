"""VMTs whose exact posterior is known: the linear-Gaussian state-space model."""

from __future__ import annotations

import torch
from torch import nn

from vmt.models.config import VMTConfig
from vmt.models.lgssm import LinearGaussianSSM
from vmt.models.vmt import VariationalMarkovTransformer


def _diagonal_scale(cov: torch.Tensor, name: str) -> torch.Tensor:
    off = cov - torch.diag(cov.diagonal())
    if bool(off.abs().max() > 0):
        raise ValueError(f"{name} must be diagonal for a VMT with diagonal Gaussian parts")
    return cov.diagonal().sqrt()


def linear_gaussian_vmt(
    ssm: LinearGaussianSSM,
    reader: nn.Module | None = None,
    feature_dim: int = 32,
    guide_hidden: int = 32,
    max_window: int = 64,
    freeze_generative: bool = True,
    guide: str = "gaussian",
    affine_structure: str = "full",
    flow_layers: int = 2,
) -> VariationalMarkovTransformer:
    """A VMT whose generative model *is* ``ssm`` (diagonal ``P0``, ``Q``, ``R``).

    ``log p(y)`` is then exact by :func:`vmt.inference.kalman.kalman_smoother`, so the gap to
    the ELBO measures the guide alone. With ``freeze_generative`` only the guide and reader
    train. ``guide`` is the guide family (``"gaussian"``, ``"full"``, ``"flow"`` with
    ``flow_layers`` couplings, or ``"affine"``, see :class:`~vmt.models.config.VMTConfig`);
    ``"affine"`` with a ``"full"`` structure contains the exact smoothing posterior.
    """
    state, obs = ssm.A.shape[0], ssm.C.shape[0]
    config = VMTConfig(
        state_dim=state, obs_dim=obs, feature_dim=feature_dim, emission="gaussian",
        transition="linear", prior_components=1, guide_hidden=guide_hidden, max_window=max_window,
        guide=guide, affine_structure=affine_structure, flow_layers=flow_layers,
    )
    vmt = VariationalMarkovTransformer(config, reader=reader)
    dtype = vmt.prior.loc.dtype
    with torch.no_grad():
        vmt.prior.logits.zero_()
        vmt.prior.loc.copy_(ssm.m0[None])
        vmt.prior.scale = _diagonal_scale(ssm.P0, "P0")[None].to(dtype)
        vmt.transition.matrix.copy_(ssm.A)
        vmt.transition.bias.copy_(ssm.b)
        vmt.transition.scale = _diagonal_scale(ssm.Q, "Q").to(dtype)
        vmt.emission.net.weight.copy_(ssm.C)
        vmt.emission.net.bias.copy_(ssm.d)
        vmt.emission.scale = _diagonal_scale(ssm.R, "R").to(dtype)
    if freeze_generative:
        for part in (vmt.prior, vmt.transition, vmt.emission):
            for p in part.parameters():
                p.requires_grad_(False)
    return vmt
