"""Conditional maximum entropy: a next-token model corrected log-linearly on a frozen base.

:func:`fit_conditional` fits the weights ``θ`` of the correction over the fitting rows of
:class:`CandidateData` (``log p(c | row) = base_logp + θ·features − log Z``); the dual of the
max-ent problem equals the average negative log-likelihood of the corrected model on those
rows (:func:`conditional_loss`), plus a constant.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CandidateData",
    "ConditionalFit",
    "conditional_log_prob",
    "conditional_loss",
    "conditional_loss_and_grad",
    "fit_conditional",
]


@dataclass
class CandidateData:
    """Fitting rows for a log-linear correction of a frozen next-token base model.

    Row ``n`` is one predicted token. The corrected model is

        log p(c | row n) = base_logp[n, c] + Σ_m θ[feat_index[n, c, m]] · feat_value[n, c, m]
                           − log Z_n

    over the row's candidates ``c``; tokens outside the candidates keep the base shape and
    share ``exp(log_rest[n])`` of base mass (``-inf`` when the candidates cover the vocabulary).

    Attributes:
        base_logp: (row, cand) float64 base log-probabilities (``-inf`` marks padding).
        log_rest: (row,) float64 log base mass outside the candidates.
        target: (row,) int64 index of the observed token among the candidates, ``-1`` if it
            is not a candidate.
        target_base_logp: (row,) float64 base log-probability of the observed token.
        feat_index: (row, cand, feat) int64 parameter indices in ``[0, n_params)``.
        feat_value: (row, cand, feat) float64 feature values (0 for unused slots).
        n_params: number of parameters ``θ``.
        weights: (row,) float64 non-negative row weights (``None``: all 1); population fits
            pass exact probabilities here.
    """

    base_logp: torch.Tensor
    log_rest: torch.Tensor
    target: torch.Tensor
    target_base_logp: torch.Tensor
    feat_index: torch.Tensor
    feat_value: torch.Tensor
    n_params: int
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        f64 = torch.float64
        self.base_logp = torch.as_tensor(self.base_logp, dtype=f64)
        self.log_rest = torch.as_tensor(self.log_rest, dtype=f64)
        self.target = torch.as_tensor(self.target, dtype=torch.int64)
        self.target_base_logp = torch.as_tensor(self.target_base_logp, dtype=f64)
        self.feat_index = torch.as_tensor(self.feat_index, dtype=torch.int64)
        self.feat_value = torch.as_tensor(self.feat_value, dtype=f64)
        if self.base_logp.ndim != 2:
            raise ValueError(f"base_logp must be (row, cand), got shape {tuple(self.base_logp.shape)}")
        n, k = self.base_logp.shape
        for name, t in (("log_rest", self.log_rest), ("target", self.target),
                        ("target_base_logp", self.target_base_logp)):
            if tuple(t.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if self.feat_index.ndim != 3 or tuple(self.feat_index.shape[:2]) != (n, k):
            raise ValueError(
                f"feat_index must be ({n}, {k}, feat), got {tuple(self.feat_index.shape)}"
            )
        if self.feat_value.shape != self.feat_index.shape:
            raise ValueError(f"feat_value shape {tuple(self.feat_value.shape)} differs from "
                             f"feat_index shape {tuple(self.feat_index.shape)}")
        if not torch.isfinite(self.feat_value).all():
            raise ValueError("feat_value contains non-finite values")
        if torch.isnan(self.base_logp).any() or (self.base_logp == math.inf).any():
            raise ValueError("base_logp contains nan or +inf")
        if torch.isnan(self.log_rest).any() or (self.log_rest > 1e-9).any():
            raise ValueError("log_rest must be a log-probability (<= 0, not nan)")
        if self.n_params < 1:
            raise ValueError(f"n_params must be positive, got {self.n_params}")
        if self.feat_index.numel() and (
            self.feat_index.min() < 0 or self.feat_index.max() >= self.n_params
        ):
            raise ValueError(f"feat_index outside [0, {self.n_params})")
        if ((self.target < -1) | (self.target >= k)).any():
            raise ValueError(f"target indices must lie in [-1, {k})")
        tb = self.target_base_logp
        if not torch.isfinite(tb).all():
            raise ValueError(
                "an observed token has zero (or non-finite) base probability; the base model "
                "must give every observed token positive probability (smooth it)"
            )
        if self.weights is not None:
            self.weights = torch.as_tensor(self.weights, dtype=f64)
            if tuple(self.weights.shape) != (n,):
                raise ValueError(f"weights must have shape ({n},), got {tuple(self.weights.shape)}")
            if not torch.isfinite(self.weights).all() or (self.weights < 0).any():
                raise ValueError("weights must be finite and non-negative")

    @property
    def n_rows(self) -> int:
        return int(self.base_logp.shape[0])

    def subset(self, rows: torch.Tensor) -> CandidateData:
        """The rows ``rows`` (an index tensor) as a new data set."""
        return CandidateData(
            self.base_logp[rows], self.log_rest[rows], self.target[rows],
            self.target_base_logp[rows], self.feat_index[rows], self.feat_value[rows],
            self.n_params, None if self.weights is None else self.weights[rows],
        )

    @staticmethod
    def concat(parts: Sequence[CandidateData]) -> CandidateData:
        """Stack rows of several data sets (same ``n_params``; candidates padded)."""
        if len({p.n_params for p in parts}) != 1:
            raise ValueError("all parts must have the same n_params")
        k = max(p.base_logp.shape[1] for p in parts)
        m = max(p.feat_index.shape[2] for p in parts)

        def pad(t, value, dims):
            pads = []
            for size, want in reversed(list(zip(t.shape[1:], dims, strict=True))):
                pads += [0, want - size]
            return torch.nn.functional.pad(t, pads, value=value)

        w = None
        if any(p.weights is not None for p in parts):
            w = torch.cat([p.weights if p.weights is not None else torch.ones(p.n_rows,
                           dtype=torch.float64) for p in parts])
        return CandidateData(
            torch.cat([pad(p.base_logp, -math.inf, (k,)) for p in parts]),
            torch.cat([p.log_rest for p in parts]),
            torch.cat([p.target for p in parts]),
            torch.cat([p.target_base_logp for p in parts]),
            torch.cat([pad(p.feat_index, 0, (k, m)) for p in parts]),
            torch.cat([pad(p.feat_value, 0.0, (k, m)) for p in parts]),
            parts[0].n_params,
            w,
        )


def _scores(theta: torch.Tensor, data: CandidateData) -> tuple[torch.Tensor, torch.Tensor]:
    s = data.base_logp + (theta[data.feat_index] * data.feat_value).sum(-1)
    log_z = torch.logsumexp(torch.cat([s, data.log_rest[:, None]], dim=1), dim=1)
    return s, log_z


def conditional_log_prob(theta: torch.Tensor, data: CandidateData) -> torch.Tensor:
    """(row,) log-probability of each observed token under the corrected model."""
    s, log_z = _scores(theta, data)
    picked = s.gather(1, data.target.clamp(min=0)[:, None])[:, 0]
    return torch.where(data.target >= 0, picked, data.target_base_logp) - log_z


def conditional_loss(theta: torch.Tensor, data: CandidateData, l2: float = 0.0) -> torch.Tensor:
    """Weighted mean negative log-likelihood plus ``l2/2 · ||θ||²`` (the regularised dual)."""
    lp = conditional_log_prob(theta, data)
    if data.weights is None:
        nll = -lp.mean()
    else:
        nll = -(data.weights * lp).sum() / data.weights.sum()
    return nll + 0.5 * l2 * (theta * theta).sum()


def conditional_loss_and_grad(
    theta: torch.Tensor, data: CandidateData, l2: float = 0.0
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Regularised dual, its NLL part, and their gradients, in closed form.

    The NLL gradient is ``E_model[f] − f(observed)`` averaged over rows (the constraint
    violation); it is accumulated with ``bincount``, much faster than autograd's scatter.

    Returns:
        ``(loss, nll, grad_nll, grad_loss)``.
    """
    theta = theta.detach()
    s, log_z = _scores(theta, data)
    probs = torch.exp(s - log_z[:, None])  # (row, cand)
    has_t = data.target >= 0
    picked = s.gather(1, data.target.clamp(min=0)[:, None])[:, 0]
    lp = torch.where(has_t, picked, data.target_base_logp) - log_z
    if data.weights is None:
        w = torch.full((data.n_rows,), 1.0 / data.n_rows, dtype=torch.float64)
    else:
        w = data.weights / data.weights.sum()
    nll = float(-(w * lp).sum())
    coef = probs.clone()
    rows = torch.nonzero(has_t, as_tuple=True)[0]
    coef[rows, data.target[rows]] -= 1.0
    coef = (coef * w[:, None])[:, :, None] * data.feat_value
    grad = torch.bincount(data.feat_index.reshape(-1), weights=coef.reshape(-1),
                          minlength=data.n_params)
    loss = nll + 0.5 * l2 * float((theta * theta).sum())
    return loss, nll, grad, grad + l2 * theta


@dataclass(frozen=True)
class ConditionalFit:
    """Result of fitting the multipliers of a conditional max-ent correction.

    Attributes:
        params: (n_params,) float64 multipliers θ.
        loss: final regularised objective (weighted mean NLL + penalty).
        nll: final weighted mean negative log-likelihood per row.
        max_violation: largest ``|E_model[f] − E_data[f]|`` per row (probability units), the
            constraint violation; with a penalty it equals ``l2·|θ|`` at the optimum.
        max_stationarity: largest gradient entry of the regularised objective.
        iterations: optimiser iterations (or epochs for Adam).
        converged: ``max_stationarity <= tol``.
        method: which solver.
    """

    params: torch.Tensor
    loss: float
    nll: float
    max_violation: float
    max_stationarity: float
    iterations: int
    converged: bool
    method: str


def _gradients(theta, data, l2):
    _, nll, g, total = conditional_loss_and_grad(theta, data, l2)
    return nll, g, total


def fit_conditional(
    data: CandidateData,
    *,
    l2: float = 0.0,
    method: str = "scipy",
    tol: float = 1e-9,
    max_iter: int = 2000,
    init: torch.Tensor | None = None,
    batch_size: int = 4096,
    epochs: int = 20,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
) -> ConditionalFit:
    """Fit θ by minimising the regularised conditional dual (= mean NLL + ``l2/2·||θ||²``).

    Args:
        data: fitting rows.
        l2: Gaussian-prior precision per row; pass ``1 / (prior_variance · n_tokens)`` for a
            prior whose strength shrinks with the amount of data.
        method: ``"scipy"`` (L-BFGS-B), ``"torch"`` (LBFGS, strong Wolfe) or ``"adam"``
            (minibatch Adam for ``epochs``, then full-batch LBFGS polishing).
        tol: stopping rule on the largest gradient entry (constraint violation + penalty).
        max_iter: iteration cap of the quasi-Newton solvers.
        init: starting θ (zeros if omitted; starting at zero keeps θ out of the gauge
            directions of redundant features).
        batch_size: Adam minibatch size (rows).
        epochs: Adam passes over the data.
        lr: Adam learning rate.
        generator: random generator for the minibatch order.
    """
    if method not in ("scipy", "torch", "adam"):
        raise ValueError(f"method must be 'scipy', 'torch' or 'adam', got {method!r}")
    with _threads_for(data):
        return _fit_conditional(data, l2, method, tol, max_iter, init, batch_size, epochs, lr,
                                generator)


@contextlib.contextmanager
def _threads_for(data: CandidateData):
    """Small problems run much faster on one thread (no intra-op scheduling, and no fight
    with other processes for cores); the previous setting is restored afterwards."""
    small = data.feat_index.numel() < 2_000_000
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and before > 1:
            torch.set_num_threads(before)


def _fit_conditional(data, l2, method, tol, max_iter, init, batch_size, epochs, lr, generator):
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be finite and non-negative, got {l2}")
    theta0 = torch.zeros(data.n_params, dtype=torch.float64) if init is None else \
        torch.as_tensor(init, dtype=torch.float64).clone()
    if tuple(theta0.shape) != (data.n_params,):
        raise ValueError(f"init must have shape ({data.n_params},), got {tuple(theta0.shape)}")
    iterations = 0
    if method == "scipy":
        from scipy.optimize import minimize

        def fun(x: np.ndarray):
            loss, _, _, grad = conditional_loss_and_grad(torch.from_numpy(x), data, l2)
            return loss, grad.numpy().copy()

        res = minimize(fun, theta0.numpy(), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-300,
                                "maxcor": 30})
        theta, iterations = torch.from_numpy(res.x), int(res.nit)
    else:
        theta = theta0
        if method == "adam":
            theta = theta.requires_grad_(True)
            opt = torch.optim.Adam([theta], lr=lr)
            n = data.n_rows
            for _ in range(epochs):
                perm = torch.randperm(n, generator=generator)
                for start in range(0, n, batch_size):
                    batch = data.subset(perm[start : start + batch_size])
                    theta.grad = conditional_loss_and_grad(theta, batch, l2)[3]
                    opt.step()
                iterations += 1
            theta = theta.detach()
        theta, it = _torch_lbfgs(theta, data, l2, tol, max_iter)
        iterations += it
    theta, polished = _newton_polish(theta, data, l2, tol)
    iterations += polished
    nll, g, total = _gradients(theta, data, l2)
    stat = float(total.abs().max())
    loss = nll + 0.5 * l2 * float((theta * theta).sum())
    return ConditionalFit(theta.detach(), loss, nll, float(g.abs().max()), stat, iterations,
                          stat <= tol, method)


def _hessian(theta: torch.Tensor, data: CandidateData, l2: float) -> torch.Tensor:
    """Dense Hessian of the regularised dual: Σ_n w_n Cov_n(f) + l2·I."""
    s, log_z = _scores(theta, data)
    probs = torch.exp(s - log_z[:, None])
    if data.weights is None:
        w = torch.full((data.n_rows,), 1.0 / data.n_rows, dtype=torch.float64)
    else:
        w = data.weights / data.weights.sum()
    P = data.n_params
    idx, val = data.feat_index, data.feat_value
    # E[f f^T]: each (row, cand) contributes the outer product of its sparse features
    pair_idx = idx[:, :, :, None] * P + idx[:, :, None, :]
    pair_val = (w[:, None] * probs)[:, :, None, None] * val[:, :, :, None] * val[:, :, None, :]
    H = torch.bincount(pair_idx.reshape(-1), weights=pair_val.reshape(-1), minlength=P * P)
    # − E[f] E[f]^T per row: flatten each row's (cand, feat) entries
    n = data.n_rows
    ri = idx.reshape(n, -1)
    rv = (probs[:, :, None] * val).reshape(n, -1)
    outer_idx = ri[:, :, None] * P + ri[:, None, :]
    outer_val = w[:, None, None] * rv[:, :, None] * rv[:, None, :]
    H = H - torch.bincount(outer_idx.reshape(-1), weights=outer_val.reshape(-1), minlength=P * P)
    return H.reshape(P, P) + l2 * torch.eye(P, dtype=torch.float64)


def _newton_polish(theta, data, l2, tol, max_steps: int = 10):
    """Newton steps on the dual once quasi-Newton has stalled at float64 line-search
    precision; only for problems whose dense Hessian is small. The pseudo-inverse keeps the
    step out of gauge directions."""
    k, m = data.feat_index.shape[1:]
    if data.n_params > 3000 or data.n_rows * (k * m) ** 2 > 30_000_000:
        return theta, 0
    steps = 0
    loss, _, _, grad = conditional_loss_and_grad(theta, data, l2)
    for _ in range(max_steps):
        stat = float(grad.abs().max())
        if stat <= tol:
            break
        H = _hessian(theta, data, l2)
        delta = torch.linalg.lstsq(H, -grad[:, None], rcond=1e-12, driver="gelsd").solution[:, 0]
        new = theta + delta
        new_loss, _, _, new_grad = conditional_loss_and_grad(new, data, l2)
        if not (new_loss <= loss + 1e-15 and float(new_grad.abs().max()) < stat):
            break
        theta, loss, grad = new, new_loss, new_grad
        steps += 1
    return theta, steps


def _torch_lbfgs(theta, data, l2, tol, max_iter):
    theta = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=30,
                            tolerance_grad=tol, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        loss, _, _, grad = conditional_loss_and_grad(theta, data, l2)
        theta.grad = grad
        return torch.tensor(loss, dtype=torch.float64)

    opt.step(closure)
    return theta.detach(), int(opt.state[opt._params[0]].get("n_iter", 0))
