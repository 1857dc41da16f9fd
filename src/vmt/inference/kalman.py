"""Exact inference in a linear-Gaussian state-space model (float64 oracle).

Model, with states ``(state,)`` and observations ``(obs,)``::

    x_1 ~ N(m0, P0),   x_{k+1} = A x_k + b + N(0, Q),   y_k = C x_k + d + N(0, R)

:func:`kalman_smoother` returns ``log p(y_{1:n})`` and the smoothing means and covariances.
It is an oracle for the VMT with ``transition="linear"`` and a linear Gaussian emission.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearGaussianSSM:
    """Parameters of a linear-Gaussian state-space model (full covariances)."""

    m0: torch.Tensor  # (state,)
    P0: torch.Tensor  # (state, state)
    A: torch.Tensor  # (state, state)
    b: torch.Tensor  # (state,)
    Q: torch.Tensor  # (state, state)
    C: torch.Tensor  # (obs, state)
    d: torch.Tensor  # (obs,)
    R: torch.Tensor  # (obs, obs)

    def simulate(self, steps: int, batch: int, generator: torch.Generator | None = None):
        """Draw ``(x, y)`` of shapes ``(batch, time, state)`` and ``(batch, time, obs)``: ``batch``
        independent sequences (independent noise in every row and step)."""
        def mvn(mean, cov, shape):
            noise = torch.randn(*shape, mean.shape[-1], generator=generator, dtype=mean.dtype)
            return mean + noise @ torch.linalg.cholesky(cov).T

        xs, ys = [], []
        x = mvn(self.m0, self.P0, (batch,))
        for _ in range(steps):
            xs.append(x)
            # one noise draw per row (a shape of () would share one draw across the batch)
            ys.append(mvn(x @ self.C.T + self.d, self.R, (batch,)))
            x = mvn(x @ self.A.T + self.b, self.Q, (batch,))
        return torch.stack(xs, 1), torch.stack(ys, 1)


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


def example_ssm(dtype: torch.dtype = torch.float32) -> LinearGaussianSSM:
    """A small, stable 2-D linear-Gaussian model with diagonal noises (rotation-like dynamics).

    Fits :func:`vmt.models.oracles.linear_gaussian_vmt`; used by the oracle tests and examples.
    """

    def t(values) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype)

    return LinearGaussianSSM(
        m0=t([0.0, 0.0]), P0=torch.eye(2, dtype=dtype),
        A=t([[0.9, 0.2], [-0.2, 0.8]]), b=t([0.1, 0.0]),
        Q=torch.diag(t([0.3, 0.2])),
        C=t([[1.0, 0.5], [0.0, 1.0]]), d=t([0.0, 0.0]),
        R=torch.diag(t([0.5, 0.4])),
    )
