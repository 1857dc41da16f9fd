"""Iterative proportional fitting: the joint max-ent problem for pure marginal constraints.

:func:`ipf` rescales a table (the prior ``p0``) axis group by axis group until its marginals
match the targets; its fixed point is the ``KL(p || p0)`` minimiser of
:mod:`vmt.mep.joint` for those constraints, which :func:`marginal_constraints` writes as
``F p = K`` so that both solvers can be compared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from vmt.mep.joint import InfeasibleConstraintsError

logger = logging.getLogger(__name__)

__all__ = ["IPFResult", "ipf", "marginal_constraints"]


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
