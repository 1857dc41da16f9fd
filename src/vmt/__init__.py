"""vmt: the Variational Markov Transformer and its companions.

A deep hidden Markov model over token sequences, written in Pyro, whose variational
posterior reads the sequence through a pretrained language model. See the docs for the
model, the shape vocabulary and the API.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
