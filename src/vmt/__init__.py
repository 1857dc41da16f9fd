"""vmt: the Variational Markov Transformer and its companions.

A deep hidden Markov model over token sequences, written in Pyro, whose variational
posterior reads the sequence through a pretrained language model. See the docs for the
model, the shape vocabulary and the API.

The main entry points are importable from here (``vmt.fit``, ``vmt.read``, ...); they are
loaded on first use, so ``import vmt`` itself stays light::

    import vmt

    model = vmt.VariationalMarkovTransformer(vmt.VMTConfig(state_dim=16, obs_dim=50, feature_dim=64))
    vmt.fit(model, documents, vmt.TrainConfig(steps=200))
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# public name -> module that defines it
_EXPORTS = {
    # the model
    "VariationalMarkovTransformer": "vmt.models",
    "VMTConfig": "vmt.models",
    "ChainBatch": "vmt.models",
    "sequences_to_batch": "vmt.models",
    # training and evaluation
    "fit": "vmt.inference.train",
    "TrainConfig": "vmt.inference.train",
    "TrainResult": "vmt.inference.train",
    "evaluate": "vmt.inference.evaluate",
    "EvalResult": "vmt.inference.evaluate",
    # reading and posterior states
    "read": "vmt.inference.reading",
    "ReadConfig": "vmt.inference.reading",
    "ReadResult": "vmt.inference.reading",
    "posterior_states": "vmt.inference.posterior",
    # writing
    "write": "vmt.inference.generation",
    "write_prequel": "vmt.inference.generation",
    "sample_unconditional": "vmt.inference.generation",
    "SamplingConfig": "vmt.inference.generation",
    "Conversation": "vmt.inference.generation",
    # checkpoints
    "save_checkpoint": "vmt.checkpoint",
    "load_checkpoint": "vmt.checkpoint",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

