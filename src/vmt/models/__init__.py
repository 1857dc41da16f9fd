"""The generative model, the guides and the chain distributions of a VMT."""

import pyro

# Parameters live in their modules (torch style), not in Pyro's global parameter store.
pyro.settings.set(module_local_params=True)

from vmt.models.batch import ChainBatch, sequences_to_batch  # noqa: E402
from vmt.models.config import VMTConfig  # noqa: E402
from vmt.models.vmt import VariationalMarkovTransformer  # noqa: E402

__all__ = ["ChainBatch", "VMTConfig", "VariationalMarkovTransformer", "sequences_to_batch"]
