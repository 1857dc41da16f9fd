"""Low-rank adapters (LoRA) for the linear layers of a pretrained transformer.

A wrapped layer computes ``base(x) + (alpha / rank) * B(A(dropout(x)))`` where ``A`` is
``(rank, in)`` and ``B`` is ``(out, rank)``. ``B`` starts at zero, so a freshly adapted model
computes exactly what the base model does; only ``A`` and ``B`` are trainable (the base
weights are frozen by :func:`add_lora`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LoRAConfig", "LoRALinear", "add_lora", "lora_parameters", "merge_lora"]


@dataclass(frozen=True)
class LoRAConfig:
    """Hyperparameters of the adapters.

    Attributes:
        rank: inner dimension of each adapter.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter input (training mode only).
        targets: names of the linear submodules to adapt (attention query and value
            projections by default, as in the LoRA paper).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one submodule")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the layer to adapt; its parameters are set to ``requires_grad=False``.
        rank: adapter rank.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the adapter input.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (for code that inspects ``.weight``, e.g. dtype lookups)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """The update ``scale * B @ A``: ``(out, in)``."""
        return self.scale * self.lora_b @ self.lora_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + self.scale * update

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def add_lora(model: nn.Module, config: LoRAConfig | None = None) -> list[LoRALinear]:
    """Replace the target linear layers of ``model`` in place with :class:`LoRALinear`.

    Every parameter of ``model`` is frozen; only the new adapter parameters are trainable.

    Returns:
        The adapters added, in module order.

    Raises:
        ValueError: if ``model`` already has adapters or no submodule matches the targets.
    """
    config = config or LoRAConfig()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    found = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in config.targets and isinstance(child, nn.Linear):
                found.append((parent, child_name, child))
    if not found:
        raise ValueError(f"no nn.Linear submodule named any of {config.targets} in the model")
    adapters = []
    for parent, child_name, child in found:
        adapter = LoRALinear(child, config.rank, config.alpha, config.dropout)
        setattr(parent, child_name, adapter)
        adapters.append(adapter)
    return adapters


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapter parameters (``lora_a``, ``lora_b``) of every adapter in ``model``."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield m.lora_a
            yield m.lora_b


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back.

    Returns:
        The number of adapters merged.
    """
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.delta_weight().to(child.base.weight.dtype)
                setattr(parent, child_name, child.base)
                count += 1
    return count
