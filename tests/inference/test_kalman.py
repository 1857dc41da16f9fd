"""The Kalman oracle against Pyro's GaussianHMM and against brute-force Gaussian algebra."""

import math

import pyro.distributions as dist
import torch

from vmt.inference.kalman import kalman_smoother
from vmt.models.lgssm import LinearGaussianSSM


def random_ssm(n=2, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    def spd(k):
        a = r(k, k)
        return a @ a.T + k * torch.eye(k, dtype=torch.float64) * 0.3
    return LinearGaussianSSM(m0=r(n), P0=spd(n), A=0.5 * r(n, n), b=r(n), Q=spd(n),
                             C=r(m, n), d=r(m), R=spd(m))


def test_loglik_matches_pyro_gaussian_hmm():
    ssm = random_ssm()
    _, y = ssm.simulate(6, 4, torch.Generator().manual_seed(1))
    ours = kalman_smoother(ssm, y).log_likelihood
    # Pyro's initial distribution sits one step before the first observation: z_0 ~ init,
    # z_1 = A z_0 + noise. With b = 0 and init = N(m, S), p(z_1) = N(A m, A S A^T + Q); pick
    # m, S so that this is N(m0, P0) (A is invertible and P0 - Q is made PSD below).
    n = 2
    A, Q = ssm.A, ssm.Q
    P0 = Q + A @ A.T * 0.7
    m0 = A @ torch.tensor([0.3, -0.2], dtype=torch.float64)
    ssm0 = LinearGaussianSSM(m0, P0, A, torch.zeros(n, dtype=torch.float64), Q, ssm.C, ssm.d, ssm.R)
    ours = kalman_smoother(ssm0, y).log_likelihood
    hmm = dist.GaussianHMM(
        initial_dist=dist.MultivariateNormal(torch.tensor([0.3, -0.2], dtype=torch.float64),
                                             0.7 * torch.eye(n, dtype=torch.float64)),
        transition_matrix=A.T,
        transition_dist=dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), Q),
        observation_matrix=ssm.C.T,
        observation_dist=dist.MultivariateNormal(ssm.d, ssm.R),
    )
    assert torch.allclose(ours, hmm.log_prob(y), rtol=1e-10)


def test_smoother_matches_joint_gaussian_conditioning():
    """Brute force: build the joint Gaussian of (x_{1:n}, y_{1:n}) and condition exactly."""
    ssm = random_ssm(seed=3)
    n, steps = 2, 4
    _, y = ssm.simulate(steps, 1, torch.Generator().manual_seed(2))
    # x = L_x (mean part) : stack states as a linear function of independent noises
    dim_x = n * steps
    mean_x = torch.zeros(dim_x, dtype=torch.float64)
    cov_x = torch.zeros(dim_x, dim_x, dtype=torch.float64)
    mean_x[:n] = ssm.m0
    cov_x[:n, :n] = ssm.P0
    for k in range(1, steps):
        s, p = slice(n * k, n * k + n), slice(n * (k - 1), n * k)
        mean_x[s] = ssm.A @ mean_x[p] + ssm.b
        cov_x[s, :] = ssm.A @ cov_x[p, :]
        cov_x[:, s] = cov_x[s, :].T
        cov_x[s, s] = ssm.A @ cov_x[p, p] @ ssm.A.T + ssm.Q
    big_c = torch.block_diag(*[ssm.C] * steps)
    mean_y = big_c @ mean_x + ssm.d.repeat(steps)
    cov_y = big_c @ cov_x @ big_c.T + torch.block_diag(*[ssm.R] * steps)
    cov_xy = cov_x @ big_c.T
    yv = y[0].reshape(-1)
    post_mean = mean_x + cov_xy @ torch.linalg.solve(cov_y, yv - mean_y)
    post_cov = cov_x - cov_xy @ torch.linalg.solve(cov_y, cov_xy.T)
    loglik = dist.MultivariateNormal(mean_y, cov_y).log_prob(yv)
    res = kalman_smoother(ssm, y)
    assert torch.allclose(res.log_likelihood[0], loglik, rtol=1e-10)
    assert torch.allclose(res.means[0].reshape(-1), post_mean, atol=1e-10)
    for k in range(steps):
        s = slice(n * k, n * k + n)
        assert torch.allclose(res.covariances[0, k], post_cov[s, s], atol=1e-10)
    assert math.isfinite(float(loglik))
