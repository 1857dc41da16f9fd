"""The generative model, the guides and the chain distributions of a VMT.

Importing this package changes no global setting: the parts turn on Pyro's
``module_local_params`` when they are constructed (:mod:`vmt.models.pyro_module`).
"""

from vmt.models.batch import ChainBatch, sequences_to_batch
from vmt.models.config import VMTConfig
from vmt.models.vmt import VariationalMarkovTransformer

__all__ = ["ChainBatch", "VMTConfig", "VariationalMarkovTransformer", "sequences_to_batch"]
