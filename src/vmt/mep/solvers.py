"""Maximum entropy / minimum divergence under linear constraints.

Joint problems (an explicit distribution over ``state`` points):

    minimise KL(p || p0)  subject to  F p = K,

whose solution is ``p(x) = p0(x) exp(λ·F(x)) / Z(λ)``, with the multipliers ``λ`` minimising
the convex dual ``D(λ) = log Z(λ) − λ·K``. The dual's gradient ``E_λ[F] − K`` is the
constraint violation, so the stopping rule is a tolerance on that violation in probability
units. Three solvers share one result type: :func:`solve_maxent_scipy` (L-BFGS-B),
:func:`solve_maxent_torch` (``torch.optim.LBFGS``) and :func:`ipf` (iterative proportional
fitting, for pure marginal constraints on a table).

Conditional problems (a next-token model corrected log-linearly on a frozen base) live in
:func:`fit_conditional`; there the dual equals the average negative log-likelihood of the
corrected model on the fitting data, plus a constant.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

__all__ = [
    "CandidateData",
    "ConditionalFit",
    "InfeasibleConstraintsError",
    "IPFResult",
    "MaxEntResult",
    "ZeroProbabilityError",
    "check_feasibility",
    "conditional_log_prob",
    "conditional_loss",
    "conditional_loss_and_grad",
    "fit_conditional",
    "ipf",
    "marginal_constraints",
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


# ------------------------------------------------------------------ marginal constraints, IPF


def marginal_constraints(
    shape: Sequence[int], marginals: Sequence[tuple[Sequence[int], np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Indicator features for marginal constraints on a table, for the dual solvers.

    Args:
        shape: the table's shape, one axis per variable (its states flattened in C order).
        marginals: ``(axes, target)`` pairs; ``target`` has shape ``[shape[a] for a in axes]``.

    Returns:
        ``(features, targets)``: (constraint, state) indicators and (constraint,) values. Shared
        sub-marginals make these constraints redundant (a gauge), which the solvers handle.
    """
    shape = tuple(int(s) for s in shape)
    grids = np.indices(shape).reshape(len(shape), -1)
    rows, values = [], []
    for axes, target in _validate_marginals(shape, marginals):
        sub = tuple(shape[a] for a in axes)
        cell = np.ravel_multi_index(tuple(grids[a] for a in axes), sub)
        onehot = np.zeros((int(np.prod(sub)), grids.shape[1]))
        onehot[cell, np.arange(grids.shape[1])] = 1.0
        rows.append(onehot)
        values.append(target.reshape(-1))
    return np.concatenate(rows), np.concatenate(values)


def _validate_marginals(shape, marginals):
    out = []
    for axes, target in marginals:
        axes = tuple(int(a) for a in axes)
        if len(set(axes)) != len(axes) or any(a < 0 or a >= len(shape) for a in axes):
            raise ValueError(f"marginal axes {axes} invalid for a table of shape {shape}")
        want = tuple(shape[a] for a in axes)
        t = np.asarray(target, dtype=np.float64)
        if t.shape != want:
            raise ValueError(f"marginal on axes {axes} must have shape {want}, got {t.shape}")
        if not np.all(np.isfinite(t)):
            raise ValueError(f"marginal on axes {axes} contains non-finite values")
        if np.any(t < 0):
            raise ValueError(f"marginal on axes {axes} has negative entries (min {t.min():.3g})")
        if abs(t.sum() - 1.0) > 1e-8:
            raise InfeasibleConstraintsError(
                f"marginal on axes {axes} sums to {t.sum():.12g}, not 1"
            )
        out.append((axes, t))
    # Overlapping marginals must agree on their shared sub-marginal.
    for i, (ax_i, t_i) in enumerate(out):
        for ax_j, t_j in out[i + 1 :]:
            shared = sorted(set(ax_i) & set(ax_j))
            if not shared:
                continue
            m_i = _sub_marginal(t_i, ax_i, shared)
            m_j = _sub_marginal(t_j, ax_j, shared)
            gap = float(np.abs(m_i - m_j).max())
            if gap > 1e-8:
                raise InfeasibleConstraintsError(
                    f"marginals on axes {ax_i} and {ax_j} disagree on their shared axes "
                    f"{tuple(shared)} by up to {gap:.3g}"
                )
    return out


def _sub_marginal(t: np.ndarray, axes: tuple[int, ...], keep: list[int]) -> np.ndarray:
    drop = tuple(i for i, a in enumerate(axes) if a not in keep)
    m = t.sum(axis=drop)
    kept = [a for a in axes if a in keep]
    return np.transpose(m, np.argsort(kept))


@dataclass(frozen=True)
class IPFResult:
    """Iterative proportional fitting result.

    Attributes:
        table: the fitted distribution, same shape as the prior.
        sweeps: full passes over the marginals.
        max_violation: largest ``|marginal − target|`` over all cells.
        converged: whether ``max_violation`` met the tolerance.
    """

    table: np.ndarray
    sweeps: int
    max_violation: float
    converged: bool


def ipf(
    prior: ArrayLike,
    marginals: Sequence[tuple[Sequence[int], np.ndarray]],
    *,
    tol: float = 1e-10,
    max_sweeps: int = 1000,
) -> IPFResult:
    """Minimum-KL table with given marginals by iterative proportional fitting.

    Each step multiplies the table by ``target / current`` on one marginal. Exact zeros of the
    prior and of the targets are kept. For a chain of neighbour-pair marginals on a uniform
    prior one sweep gives the Markov chain exactly.

    Args:
        prior: a non-negative table, one axis per variable (normalised internally).
        marginals: ``(axes, target)`` pairs, each target summing to 1.
        tol: stopping rule on the largest marginal violation.
        max_sweeps: cap on full passes.

    Raises:
        InfeasibleConstraintsError: targets that disagree on shared axes, or positive target
            mass where the prior has none.
    """
    table = np.asarray(prior, dtype=np.float64)
    if not np.all(np.isfinite(table)):
        raise ValueError("prior contains non-finite values")
    if np.any(table < 0):
        raise ValueError(f"prior has negative entries (min {table.min():.3g})")
    if table.sum() <= 0:
        raise ValueError("prior has no mass")
    table = table / table.sum()
    checked = _validate_marginals(table.shape, marginals)
    if not checked:
        raise ValueError("ipf needs at least one marginal")

    def current(axes):
        drop = tuple(a for a in range(table.ndim) if a not in axes)
        m = table.sum(axis=drop)  # remaining axes in increasing order
        ordered = sorted(axes)
        return np.transpose(m, [ordered.index(a) for a in axes])

    def expand(arr, axes):
        # place an array over `axes` into a broadcastable shape of the table
        perm = np.argsort(axes)
        arr = np.transpose(arr, perm)
        shape = [1] * table.ndim
        for a in sorted(axes):
            shape[a] = table.shape[a]
        return arr.reshape(shape)

    def violation() -> float:
        return max(float(np.abs(current(ax) - t).max()) for ax, t in checked)

    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007
        for axes, target in checked:
            cur = current(axes)
            if np.any((cur <= 0) & (target > 0)):
                raise InfeasibleConstraintsError(
                    f"marginal on axes {axes} puts mass where the table has none"
                )
            ratio = np.divide(target, cur, out=np.zeros_like(target), where=cur > 0)
            table = table * expand(ratio, axes)
        if violation() <= tol:
            break
    v = violation()
    if v > tol:
        logger.warning("ipf stopped after %d sweeps with violation %.3g", sweeps, v)
    return IPFResult(table, sweeps, v, v <= tol)


# ----------------------------------------------------------------------- conditional problems


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
