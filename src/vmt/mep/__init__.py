"""Maximum-entropy extension of a short-window next-token model (MEP, GMEP, SMEP).

A base model ``q_T`` that reads only the last ``T`` tokens is corrected by multipliers on
far token pairs, ``p*(x_n | past) ∝ q_T(x_n | window) · exp(Σ_d λ_d(x_{n−d}, x_n))``; the
multipliers are found on the convex dual. See ``docs/mep.md`` for the formulation.
"""

from vmt.mep.bases import LMCandidates, NGramBase, TableBase, UniformBase, WindowedLM
from vmt.mep.models import (
    MEPConfig,
    MEPModel,
    SMEPModel,
    copy_similarity_features,
    gmep_model,
    windows_from_sequences,
)
from vmt.mep.oracles import (
    MarkovSource,
    enumerate_sequences,
    higher_order_source,
    markov_source,
    pairwise_source,
)
from vmt.mep.solvers import (
    CandidateData,
    ConditionalFit,
    InfeasibleConstraintsError,
    IPFResult,
    MaxEntResult,
    ZeroProbabilityError,
    check_feasibility,
    conditional_log_prob,
    conditional_loss,
    conditional_loss_and_grad,
    fit_conditional,
    ipf,
    marginal_constraints,
    solve_maxent_scipy,
    solve_maxent_torch,
)

__all__ = [
    "CandidateData",
    "ConditionalFit",
    "IPFResult",
    "InfeasibleConstraintsError",
    "LMCandidates",
    "MEPConfig",
    "MEPModel",
    "MarkovSource",
    "MaxEntResult",
    "NGramBase",
    "SMEPModel",
    "TableBase",
    "UniformBase",
    "WindowedLM",
    "ZeroProbabilityError",
    "check_feasibility",
    "conditional_log_prob",
    "conditional_loss",
    "conditional_loss_and_grad",
    "copy_similarity_features",
    "enumerate_sequences",
    "fit_conditional",
    "gmep_model",
    "higher_order_source",
    "ipf",
    "marginal_constraints",
    "markov_source",
    "pairwise_source",
    "solve_maxent_scipy",
    "solve_maxent_torch",
    "windows_from_sequences",
]
