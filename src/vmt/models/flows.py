"""The coupling-flow stack shared by the flow prior, the flow transition and the flow guide.

A stack is ``layers`` affine couplings, each followed by a fixed random permutation of the
``state`` coordinates. The couplings are held by the owning module under its own attribute
name and the permutations as its buffers ``perm_0, perm_1, ...``, so checkpoints keep the
keys they always had.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyro.distributions.transforms as T
import torch
from torch import nn

__all__ = ["add_couplings", "coupling_transforms"]


def add_couplings(owner: nn.Module, name: str, couplings: Iterable[nn.Module], state_dim: int) -> None:
    """Register ``couplings`` as ``owner.<name>`` (an ``nn.ModuleList``), then one random
    permutation of ``range(state_dim)`` per coupling as buffer ``owner.perm_<i>`` (drawn after
    all couplings are built)."""
    setattr(owner, name, nn.ModuleList(couplings))
    for i in range(len(getattr(owner, name))):
        owner.register_buffer(f"perm_{i}", torch.randperm(state_dim))


def coupling_transforms(owner: nn.Module, couplings: nn.ModuleList, context: torch.Tensor | None = None) -> list:
    """``[coupling_0, permute_0, coupling_1, permute_1, ...]``, each coupling conditioned on
    ``context (..., context)`` when given (conditional couplings) or used as is."""
    transforms = []
    for i, coupling in enumerate(couplings):
        step = coupling if context is None else coupling.condition(context)
        transforms += [step, T.Permute(getattr(owner, f"perm_{i}"))]
    return transforms
