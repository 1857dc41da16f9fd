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

The solvers live in three modules, re-exported here under their names: :mod:`vmt.mep.joint`
(the joint max-ent solvers and the feasibility check), :mod:`vmt.mep.proportional_fitting`
(IPF) and :mod:`vmt.mep.conditional` (the conditional fit).
"""

from __future__ import annotations

from vmt.mep.conditional import (
    CandidateData,
    ConditionalFit,
    conditional_log_prob,
    conditional_loss,
    conditional_loss_and_grad,
    fit_conditional,
)
from vmt.mep.joint import (
    InfeasibleConstraintsError,
    MaxEntResult,
    ZeroProbabilityError,
    check_feasibility,
    solve_maxent_scipy,
    solve_maxent_torch,
)
from vmt.mep.proportional_fitting import IPFResult, ipf, marginal_constraints

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
