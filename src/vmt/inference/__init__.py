"""Inference for a VMT: training, evaluation, reading, posterior states and writing.

The main functions are importable from here and load on first use::

    from vmt.inference import fit, TrainConfig, read, ReadConfig, write

``evaluate`` is also the name of the submodule that defines it, so the function is exported
from the top level only (``vmt.evaluate``); here ``vmt.inference.evaluate`` is the module.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "fit": "train",
    "TrainConfig": "train",
    "TrainResult": "train",
    "EvalResult": "evaluate",
    "elbo_terms": "elbo",
    "ElboTerms": "elbo",
    "read": "reading",
    "ReadConfig": "reading",
    "ReadResult": "reading",
    "continuation_cost": "reading",
    "posterior_states": "posterior",
    "summarize": "posterior",
    "plot_trajectories": "posterior",
    "plot_projection": "posterior",
    "plot_predictive": "posterior",
    "write": "generation",
    "write_prequel": "generation",
    "sample_unconditional": "generation",
    "SamplingConfig": "generation",
    "Written": "generation",
    "Conversation": "generation",
    "next_token_probs": "predictive",
    "filter_continuation": "predictive",
    "reverse_documents": "reverse",
    "freeze_shared_parts": "reverse",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmt.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

