"""Joint maximum entropy / minimum divergence under linear constraints.

An explicit distribution over ``state`` points:

    minimise KL(p || p0)  subject to  F p = K,

whose solution is ``p(x) = p0(x) exp(λ·F(x)) / Z(λ)``, with the multipliers ``λ`` minimising
the convex dual ``D(λ) = log Z(λ) − λ·K``. The dual's gradient ``E_λ[F] − K`` is the
constraint violation, so the stopping rule is a tolerance on that violation in probability
units. Two solvers share one result type: :func:`solve_maxent_scipy` (L-BFGS-B) and
:func:`solve_maxent_torch` (``torch.optim.LBFGS``); :func:`check_feasibility` says first whether
any distribution meets the constraints. For pure marginal constraints on a table see
:mod:`vmt.mep.proportional_fitting`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

__all__ = [
    "InfeasibleConstraintsError",
    "MaxEntResult",
    "ZeroProbabilityError",
    "check_feasibility",
    "solve_maxent_scipy",
    "solve_maxent_torch",
]


class InfeasibleConstraintsError(ValueError):
    """No probability distribution (on the prior's support) satisfies the constraints."""


class ZeroProbabilityError(ValueError):
    """The constraints can only be met by giving exact zeros to some states of the prior's
    support; the multipliers are infinite there."""


# ----------------------------------------------------------------------------- joint problems


@dataclass(frozen=True)
class MaxEntResult:
    """Solution of a joint maximum-entropy problem.

    Attributes:
        probs: (state,) the max-ent distribution.
        multipliers: (constraint,) Lagrange multipliers, gauge-fixed to minimum norm (the
            component along redundant constraint directions is removed).
        log_partition: ``log Z`` at the returned multipliers.
        iterations: solver iterations.
        max_violation: ``max |F p − K|``, in probability units.
        converged: whether ``max_violation`` met the tolerance.
        method: which solver produced it.
        gauge_dim: number of redundant constraint directions (multipliers not identified).
        support: (state,) bool, states allowed non-zero probability.
    """

    probs: np.ndarray
    multipliers: np.ndarray
    log_partition: float
    iterations: int
    max_violation: float
    converged: bool
    method: str
    gauge_dim: int
    support: np.ndarray


@dataclass(frozen=True)
class _Problem:
    features: np.ndarray  # (constraint, state)
    targets: np.ndarray  # (constraint,)
    log_prior: np.ndarray  # (state,), -inf off support
    support: np.ndarray  # (state,) bool


def _as_float_array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return arr


def _validate(features, targets, prior) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    F = _as_float_array("features", features, 2)
    K = _as_float_array("targets", targets, 1)
    if F.shape[0] != K.shape[0]:
        raise ValueError(
            f"features has {F.shape[0]} constraint rows (shape {F.shape}) but targets has "
            f"{K.shape[0]} entries"
        )
    n_states = F.shape[1]
    if n_states == 0:
        raise ValueError("features has no states (shape (constraint, 0))")
    if prior is None:
        p0 = np.full(n_states, 1.0 / n_states)
    else:
        p0 = _as_float_array("prior", prior, 1)
        if p0.shape[0] != n_states:
            raise ValueError(f"prior has shape {p0.shape} but features has {n_states} states")
        if np.any(p0 < 0):
            raise ValueError(f"prior has negative entries (min {p0.min():.3g})")
        total = p0.sum()
        if total <= 0:
            raise ValueError("prior has no mass")
        p0 = p0 / total
    return F, K, p0


def check_feasibility(
    features: ArrayLike, targets: ArrayLike, prior: ArrayLike | None = None, *, tol: float = 1e-9
) -> np.ndarray:
    """Check that some distribution on the prior's support meets ``F p = K``.

    Two linear programmes: the least total violation over the simplex (infeasible if above
    ``tol``), then the largest support any feasible distribution can have.

    Args:
        features: (constraint, state) feature values ``F``.
        targets: (constraint,) wanted expectations ``K``.
        prior: (state,) non-negative weights (uniform if omitted).
        tol: tolerance on the least total violation.

    Returns:
        (state,) bool: states that some feasible distribution gives positive probability.

    Raises:
        InfeasibleConstraintsError: no distribution meets the constraints.
    """
    from scipy import sparse
    from scipy.optimize import linprog

    F, K, p0 = _validate(features, targets, prior)
    supp = p0 > 0
    Fs = F[:, supp]
    n_c, n_s = Fs.shape
    scale = max(1.0, float(np.abs(F).max()), float(np.abs(K).max()))
    # 1) min sum(s+ + s-) s.t. Fs p + s+ - s- = K, 1·p = 1, p, s >= 0
    c = np.concatenate([np.zeros(n_s), np.ones(2 * n_c)])
    eye_c = sparse.identity(n_c, format="csr")
    A_eq = sparse.bmat(
        [[sparse.csr_matrix(Fs), eye_c, -eye_c], [sparse.csr_matrix(np.ones((1, n_s))), None, None]],
        format="csr",
    )
    b_eq = np.concatenate([K, [1.0]])
    res = linprog(c, A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"feasibility linear programme failed: {res.message}")
    if res.fun > tol * scale:
        raise InfeasibleConstraintsError(
            "no probability distribution on the prior's support satisfies the constraints: "
            f"the least total violation sum|F p - K| is {res.fun:.3g} (tolerance {tol * scale:.3g})"
        )
    # 2) largest support: r >= 0, tau >= 0, 0 <= u <= 1, u <= r, Fs r = K tau, 1·r = tau;
    #    maximise sum(u). Any state that a feasible p can reach gets u = 1 after scaling.
    n_var = 2 * n_s + 1  # r, u, tau
    c2 = np.concatenate([np.zeros(n_s), -np.ones(n_s), [0.0]])
    A_eq2 = sparse.bmat(
        [[sparse.csr_matrix(Fs), None, sparse.csr_matrix(-K[:, None])],
         [sparse.csr_matrix(np.ones((1, n_s))), None, sparse.csr_matrix(-np.ones((1, 1)))]],
        format="csr",
    )
    if A_eq2.shape[1] != 2 * n_s + 1:  # bmat drops the all-empty middle block column
        A_eq2 = sparse.hstack([A_eq2[:, :n_s], sparse.csr_matrix((n_c + 1, n_s)),
                               A_eq2[:, n_s:]], format="csr")
    b_eq2 = np.zeros(n_c + 1)
    eye_s = sparse.identity(n_s, format="csr")
    A_ub2 = sparse.hstack([-eye_s, eye_s, sparse.csr_matrix((n_s, 1))], format="csr")
    b_ub2 = np.zeros(n_s)
    bounds = [(0, None)] * n_s + [(0, 1)] * n_s + [(0, None)]
    assert len(bounds) == n_var
    res2 = linprog(c2, A_ub=A_ub2, b_ub=b_ub2, A_eq=A_eq2, b_eq=b_eq2, bounds=bounds,
                   method="highs")
    if res2.status != 0:
        raise RuntimeError(f"support linear programme failed: {res2.message}")
    reach = np.zeros(F.shape[1], dtype=bool)
    reach[np.flatnonzero(supp)] = res2.x[n_s : 2 * n_s] > 0.5
    return reach


def _prepare(features, targets, prior, on_boundary: str, check: bool) -> _Problem:
    if on_boundary not in ("error", "restrict"):
        raise ValueError(f"on_boundary must be 'error' or 'restrict', got {on_boundary!r}")
    F, K, p0 = _validate(features, targets, prior)
    support = p0 > 0
    if check:
        reach = check_feasibility(F, K, p0)
        forced = support & ~reach
        if forced.any():
            if on_boundary == "error":
                idx = np.flatnonzero(forced)
                raise ZeroProbabilityError(
                    f"the constraints force zero probability on {idx.size} state(s) of the "
                    f"prior's support (e.g. indices {idx[:5].tolist()}), so some multipliers "
                    "are infinite; pass on_boundary='restrict' to solve on the reduced support"
                )
            support = reach
    log_prior = np.full(p0.shape, -np.inf)
    log_prior[support] = np.log(p0[support])
    return _Problem(F, K, log_prior, support)


def _gauge_fix(problem: _Problem, lam: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove the multiplier components that do not change the distribution.

    Directions ``v`` with ``v·F(x)`` constant over the support are absorbed by ``log Z``;
    the minimum-norm representative is the projection onto their orthogonal complement.
    """
    Fs = problem.features[:, problem.support]
    A = Fs - Fs[:, :1]
    if A.shape[1] == 0:
        return np.zeros_like(lam), lam.size
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    rank = int((s > s.max(initial=0.0) * max(A.shape) * 1e-12).sum()) if s.size else 0
    Ur = U[:, :rank]
    return Ur @ (Ur.T @ lam), lam.size - rank


def _finish(problem: _Problem, lam, iterations, tol, method) -> MaxEntResult:
    lam, gauge_dim = _gauge_fix(problem, np.asarray(lam, dtype=np.float64))
    logits = problem.log_prior + lam @ problem.features
    log_z = float(np.logaddexp.reduce(logits[problem.support]))
    probs = np.where(problem.support, np.exp(logits - log_z), 0.0)
    violation = float(np.abs(problem.features @ probs - problem.targets).max(initial=0.0))
    converged = violation <= tol
    if not converged:
        logger.warning("%s stopped with constraint violation %.3g > %.3g", method, violation, tol)
    return MaxEntResult(probs, lam, log_z, int(iterations), violation, converged, method,
                        gauge_dim, problem.support.copy())


def solve_maxent_scipy(
    features: ArrayLike,
    targets: ArrayLike,
    prior: ArrayLike | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
    on_boundary: str = "error",
    check: bool = True,
) -> MaxEntResult:
    """Minimum-divergence distribution under ``F p = K`` by L-BFGS-B on the dual (scipy).

    Args:
        features: (constraint, state) feature values.
        targets: (constraint,) wanted expectations.
        prior: (state,) non-negative base weights ``p0`` (uniform if omitted, which gives
            maximum entropy); states with zero prior stay at zero.
        tol: stopping rule, the largest allowed ``|F p − K|``.
        max_iter: iteration cap.
        on_boundary: ``"error"`` raises :class:`ZeroProbabilityError` when the constraints
            force zeros on the prior's support; ``"restrict"`` solves on the reduced support.
        check: run the feasibility linear programmes first (turn off for large problems).

    Raises:
        InfeasibleConstraintsError: no distribution on the prior's support meets the constraints.
        ZeroProbabilityError: the constraints force zeros and ``on_boundary="error"``.
        ValueError: bad shapes or non-finite values.
    """
    from scipy.optimize import minimize

    problem = _prepare(features, targets, prior, on_boundary, check)
    Fs = problem.features[:, problem.support]
    lp = problem.log_prior[problem.support]
    K = problem.targets

    def dual(lam: np.ndarray) -> tuple[float, np.ndarray]:
        logits = lp + lam @ Fs
        m = logits.max()
        w = np.exp(logits - m)
        z = w.sum()
        p = w / z
        return float(m + math.log(z) - lam @ K), Fs @ p - K

    x0 = np.zeros(K.shape[0])
    res = minimize(dual, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-300, "maxcor": 30})
    lam, nit = res.x, res.nit
    # L-BFGS-B can stop on a flat line search just short of the tolerance; finish with a few
    # Newton steps on the dual (Hessian = covariance of the features, pseudo-inverted because
    # of the gauge) when the problem is small enough.
    for _ in range(20):
        logits = lp + lam @ Fs
        p = np.exp(logits - np.logaddexp.reduce(logits))
        g = Fs @ p - K
        if np.abs(g).max(initial=0.0) <= tol or K.shape[0] > 2000:
            break
        mean = Fs @ p
        H = (Fs * p) @ Fs.T - np.outer(mean, mean)
        lam = lam - np.linalg.lstsq(H, g, rcond=1e-13)[0]
        nit += 1
    return _finish(problem, lam, nit, tol, "scipy-lbfgsb")


def solve_maxent_torch(
    features: ArrayLike,
    targets: ArrayLike,
    prior: ArrayLike | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
    on_boundary: str = "error",
    check: bool = True,
) -> MaxEntResult:
    """The same problem as :func:`solve_maxent_scipy`, with ``torch.optim.LBFGS`` in float64
    (strong Wolfe line search); the stopping rule is the constraint violation."""
    problem = _prepare(features, targets, prior, on_boundary, check)
    Fs = torch.as_tensor(problem.features[:, problem.support])
    lp = torch.as_tensor(problem.log_prior[problem.support])
    K = torch.as_tensor(problem.targets)
    lam = torch.zeros(K.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=50, history_size=30, tolerance_grad=tol,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.logsumexp(lp + lam @ Fs, 0) - lam @ K
        loss.backward()
        return loss

    iterations, best = 0, math.inf
    while iterations < max_iter:
        opt.step(closure)
        iterations = opt.state[opt._params[0]]["n_iter"]
        with torch.no_grad():
            p = torch.softmax(lp + lam @ Fs, 0)
            viol = float((Fs @ p - K).abs().max())
        if viol <= tol or viol > 0.9 * best:  # met, or the line search stalled
            break
        best = viol
    # As in the scipy solver: the line search cannot resolve dual decreases below float64
    # precision, so finish with Newton steps (pseudo-inverse Hessian, because of the gauge).
    lam = lam.detach()
    for _ in range(20):
        p = torch.softmax(lp + lam @ Fs, 0)
        mean = Fs @ p
        g = mean - K
        if g.abs().max() <= tol or K.shape[0] > 2000:
            break
        H = (Fs * p) @ Fs.T - torch.outer(mean, mean)
        lam = lam - torch.linalg.lstsq(H, g[:, None], rcond=1e-13, driver="gelsd").solution[:, 0]
        iterations += 1
    return _finish(problem, lam.detach().numpy(), iterations, tol, "torch-lbfgs")
