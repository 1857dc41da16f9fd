"""Exact inference in a linear-Gaussian state-space model (float64 oracle).

The model (:class:`vmt.models.lgssm.LinearGaussianSSM`), with states ``(state,)`` and observations ``(obs,)``::

    x_1 ~ N(m0, P0),   x_{k+1} = A x_k + b + N(0, Q),   y_k = C x_k + d + N(0, R)

:func:`kalman_smoother` returns ``log p(y_{1:n})`` and the smoothing means and covariances.
It is an oracle for the VMT with ``transition="linear"`` and a linear Gaussian emission.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The model is data of the models layer (vmt.models.lgssm); re-exported for older imports.
from vmt.models.lgssm import LinearGaussianSSM as LinearGaussianSSM
from vmt.models.lgssm import example_ssm as example_ssm

__all__ = ["SmootherResult", "kalman_smoother"]


@dataclass
class SmootherResult:
    log_likelihood: torch.Tensor  # (batch,)
    means: torch.Tensor  # (batch, time, state)
    covariances: torch.Tensor  # (batch, time, state, state)


def kalman_smoother(ssm: LinearGaussianSSM, y: torch.Tensor) -> SmootherResult:
    """Kalman filter + Rauch-Tung-Striebel smoother for ``y (batch, time, obs)``."""
    if y.dim() != 3 or y.shape[-1] != ssm.C.shape[0]:
        raise ValueError(f"y must be (batch, time, {ssm.C.shape[0]}), got {tuple(y.shape)}")
    batch, steps, _ = y.shape
    n = ssm.m0.shape[0]
    mean = ssm.m0.expand(batch, n)
    cov = ssm.P0.expand(batch, n, n)
    loglik = y.new_zeros(batch)
    f_means, f_covs, p_means, p_covs = [], [], [], []
    for k in range(steps):
        if k > 0:
            mean = mean @ ssm.A.T + ssm.b
            cov = ssm.A @ cov @ ssm.A.T + ssm.Q
        p_means.append(mean)
        p_covs.append(cov)
        s = ssm.C @ cov @ ssm.C.T + ssm.R
        resid = y[:, k] - (mean @ ssm.C.T + ssm.d)
        loglik = loglik + torch.distributions.MultivariateNormal(torch.zeros_like(resid), s).log_prob(resid)
        gain = cov @ ssm.C.T @ torch.linalg.inv(s)
        mean = mean + (gain @ resid.unsqueeze(-1)).squeeze(-1)
        cov = cov - gain @ ssm.C @ cov
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        f_means.append(mean)
        f_covs.append(cov)
    s_means, s_covs = [f_means[-1]], [f_covs[-1]]
    for k in range(steps - 2, -1, -1):
        j = f_covs[k] @ ssm.A.T @ torch.linalg.inv(p_covs[k + 1])
        m = f_means[k] + (j @ (s_means[0] - p_means[k + 1]).unsqueeze(-1)).squeeze(-1)
        c = f_covs[k] + j @ (s_covs[0] - p_covs[k + 1]) @ j.transpose(-1, -2)
        s_means.insert(0, m)
        s_covs.insert(0, c)
    return SmootherResult(loglik, torch.stack(s_means, 1), torch.stack(s_covs, 1))


@dataclass
class BackwardInformation:
    """``p(y_{k:n} | x_k) ∝ exp(-x_k^T J_k x_k / 2 + eta_k^T x_k)`` for every ``k``.

    Attributes:
        precision: ``(time, state, state)`` the ``J_k`` (they do not depend on ``y``).
        shift: ``(batch, time, state)`` the ``eta_k`` (linear in ``y_{k:n}``).
    """

    precision: torch.Tensor
    shift: torch.Tensor


def backward_information(ssm: LinearGaussianSSM, y: torch.Tensor) -> BackwardInformation:
    """The backward information filter of ``y (batch, time, obs)``.

    ``eta_k`` summarises ``y_k .. y_n`` exactly (what a reversed reader should compute), and
    the smoothing posterior's conditionals follow from it:
    ``p(x_k | x_{k-1}, y_{k:n}) ∝ N(x_k; A x_{k-1} + b, Q) exp(-x_k^T J_k x_k / 2 + eta_k^T x_k)``.
    """
    if y.dim() != 3 or y.shape[-1] != ssm.C.shape[0]:
        raise ValueError(f"y must be (batch, time, {ssm.C.shape[0]}), got {tuple(y.shape)}")
    r_inv = torch.linalg.inv(ssm.R)
    q_inv = torch.linalg.inv(ssm.Q)
    obs_j = ssm.C.T @ r_inv @ ssm.C
    obs_eta = (y - ssm.d) @ (r_inv @ ssm.C)  # (batch, time, state)
    precisions, shifts = [obs_j], [obs_eta[:, -1]]
    for k in range(y.shape[1] - 2, -1, -1):
        j_next, eta_next = precisions[0], shifts[0]
        m = torch.linalg.inv(q_inv + j_next)
        qa = q_inv @ ssm.A
        j = obs_j + ssm.A.T @ q_inv @ ssm.A - qa.T @ m @ qa
        eta = obs_eta[:, k] + (eta_next + q_inv @ ssm.b) @ m @ qa - ssm.b @ qa
        precisions.insert(0, j)
        shifts.insert(0, eta)
    return BackwardInformation(torch.stack(precisions), torch.stack(shifts, 1))

