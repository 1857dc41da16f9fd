"""The linear-Gaussian state-space model: parameters as data, a sampler and a small example.

Model, with states ``(state,)`` and observations ``(obs,)``::

    x_1 ~ N(m0, P0),   x_{k+1} = A x_k + b + N(0, Q),   y_k = C x_k + d + N(0, R)

Its exact posterior is :func:`vmt.inference.kalman.kalman_smoother`; a VMT whose generative
model is this one is :func:`vmt.models.oracles.linear_gaussian_vmt`. The model lives here, in
the models layer, so that both can import it in the layer order (``docs/architecture.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LinearGaussianSSM", "example_ssm"]


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
