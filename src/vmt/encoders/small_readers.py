"""Small trainable readers that summarise the rest of a sequence (reverse) or its past.

They serve as the guide's reader when no pretrained LM is used (over tokens, or over any
real-valued sequence such as a piano roll) or on top of frozen forward LM features. Both share
the contract of :class:`vmt.encoders.features.LMFeatureExtractor`: right-padded inputs and
lengths in, ``(batch, time, hidden)`` out, with ``out[b, k]`` summarising
``inputs[b, k:lengths[b]]`` in reverse mode (``inputs[b, :k+1]`` in forward mode) and zeros at
padding positions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from vmt.encoders.features import check_lengths, flip_within_lengths, length_mask

__all__ = ["GRUReader", "TransformerReader"]

InputKind = Literal["tokens", "features"]
Direction = Literal["reverse", "forward"]


def _unpadded(lengths: torch.Tensor, time: int) -> bool:
    """Whether every row of a ``(batch,)`` ``lengths`` (checked to lie in ``[1, time]``)
    fills all ``time`` positions (then masking is a no-op and flipping within lengths is a
    plain flip; e.g. the windows a long read encodes)."""
    return lengths.numel() > 0 and int(lengths.min()) == time


class _Reader(nn.Module):
    """Input embedding, direction handling and output masking shared by the readers."""

    def __init__(
        self,
        input: InputKind,
        width: int,
        direction: Direction,
        vocab_size: int | None,
        embed_dim: int | None,
        feature_dim: int | None,
    ) -> None:
        super().__init__()
        if direction not in ("reverse", "forward"):
            raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
        if input == "tokens":
            if vocab_size is None or vocab_size < 1:
                raise ValueError(f"input='tokens' needs vocab_size >= 1, got {vocab_size}")
            embed_dim = width if embed_dim is None else embed_dim
            if embed_dim < 1:
                raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
            self.embed: nn.Module = nn.Embedding(vocab_size, embed_dim)
            self.input_dim = embed_dim
        elif input == "features":
            if feature_dim is None or feature_dim < 1:
                raise ValueError(f"input='features' needs feature_dim >= 1, got {feature_dim}")
            self.embed = nn.Identity()
            self.input_dim = feature_dim
        else:
            raise ValueError(f"input must be 'tokens' or 'features', got {input!r}")
        self.input = input
        self.direction: Direction = direction
        self.vocab_size = vocab_size
        self.feature_dim = feature_dim

    def _prepare(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Validate, embed and (reverse mode) flip: returns ``(batch, time, input_dim)``."""
        if self.input == "tokens":
            if inputs.dim() != 2 or inputs.dtype != torch.int64:
                raise ValueError(
                    f"token inputs must be (batch, time) int64, got {inputs.dtype} "
                    f"{tuple(inputs.shape)}"
                )
        elif inputs.dim() != 3 or inputs.shape[2] != self.feature_dim:
            raise ValueError(
                f"feature inputs must be (batch, time, {self.feature_dim}), got "
                f"{tuple(inputs.shape)}"
            )
        elif not inputs.is_floating_point():
            raise ValueError(f"feature inputs must be floating point, got {inputs.dtype}")
        batch, time = inputs.shape[:2]
        check_lengths(batch, time, lengths)
        if _unpadded(lengths, time):  # nothing to mask; flipping within lengths is flipping
            return self.embed(inputs.flip(1) if self.direction == "reverse" else inputs)
        lengths = lengths.to(inputs.device)
        valid = length_mask(lengths, time)
        if self.input == "tokens":
            inputs = inputs.masked_fill(~valid, 0)
        else:
            inputs = inputs.masked_fill(~valid[:, :, None], 0.0)
        if self.direction == "reverse":
            inputs = flip_within_lengths(inputs, lengths)
        return self.embed(inputs)

    def _finish(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``out (batch, time, hidden)`` in input order, zero at padding."""
        if _unpadded(lengths, out.shape[1]):
            return out.flip(1) if self.direction == "reverse" else out
        lengths = lengths.to(out.device)
        if self.direction == "reverse":
            out = flip_within_lengths(out, lengths)
        return out * length_mask(lengths, out.shape[1])[:, :, None].to(out.dtype)


class GRUReader(_Reader):
    """A (stacked) unidirectional GRU run over the reversed (or forward) sequence.

    Args:
        input: ``"tokens"`` (then ``vocab_size`` and optionally ``embed_dim``, default
            ``hidden_size``) or ``"features"`` (then ``feature_dim``).
        hidden_size: size of the output vectors.
        num_layers: stacked GRU layers.
        direction: ``"reverse"`` or ``"forward"``.
        vocab_size: number of token ids (tokens input).
        embed_dim: token embedding size (tokens input).
        feature_dim: size of an input vector (features input).
        dropout: between GRU layers (when ``num_layers > 1``).
    """

    def __init__(
        self,
        input: InputKind,
        hidden_size: int,
        num_layers: int = 1,
        direction: Direction = "reverse",
        *,
        vocab_size: int | None = None,
        embed_dim: int | None = None,
        feature_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"hidden_size and num_layers must be >= 1, got {hidden_size}, {num_layers}"
            )
        super().__init__(input, hidden_size, direction, vocab_size, embed_dim, feature_dim)
        self.hidden_size = hidden_size
        self.gru = nn.GRU(
            self.input_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``inputs`` ``(batch, time)`` int64 or ``(batch, time, feature)`` float, ``lengths``
        ``(batch,)`` int64 -> ``(batch, time, hidden)``, zero at padding."""
        x = self._prepare(inputs, lengths)
        # Rows are right-padded after flipping, and the GRU reads left to right, so padding
        # never reaches a valid position; no packing needed.
        out, _ = self.gru(x)
        return self._finish(out, lengths)


def _sinusoidal(time: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(time, dim)`` sinusoidal position codes (any length, no parameters)."""
    pos = torch.arange(time, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(time, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


class _CausalBlock(nn.Module):
    """Pre-norm causal self-attention block."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        heads = (batch, time, self.num_heads, width // self.num_heads)
        q, k, v = (t.reshape(heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(att.transpose(1, 2).reshape(batch, time, width))
        return x + self.mlp(self.norm2(x))


class TransformerReader(_Reader):
    """A small causal transformer run over the reversed (or forward) sequence.

    Inputs are projected to ``hidden_size``, get sinusoidal positions (counted from the
    first token read, i.e. from the end of the row in reverse mode) and go through
    ``num_layers`` pre-norm causal blocks and a final LayerNorm.

    Args:
        input: ``"tokens"`` (then ``vocab_size``, ``embed_dim``) or ``"features"``
            (then ``feature_dim``).
        hidden_size: model width and output size (divisible by ``num_heads``).
        num_layers: transformer blocks.
        direction: ``"reverse"`` or ``"forward"``.
        num_heads: attention heads.
        mlp_ratio: MLP width as a multiple of ``hidden_size``.
        dropout: attention dropout (training mode only).
    """

    def __init__(
        self,
        input: InputKind,
        hidden_size: int,
        num_layers: int = 2,
        direction: Direction = "reverse",
        *,
        vocab_size: int | None = None,
        embed_dim: int | None = None,
        feature_dim: int | None = None,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        if hidden_size < 1 or num_layers < 1 or num_heads < 1:
            raise ValueError(
                f"hidden_size, num_layers, num_heads must be >= 1, got "
                f"{hidden_size}, {num_layers}, {num_heads}"
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        super().__init__(input, hidden_size, direction, vocab_size, embed_dim, feature_dim)
        self.hidden_size = hidden_size
        self.input_proj = (
            nn.Identity()
            if self.input_dim == hidden_size
            else nn.Linear(self.input_dim, hidden_size)
        )
        self.blocks = nn.ModuleList(
            _CausalBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``inputs`` ``(batch, time)`` int64 or ``(batch, time, feature)`` float, ``lengths``
        ``(batch,)`` int64 -> ``(batch, time, hidden)``, zero at padding."""
        x = self.input_proj(self._prepare(inputs, lengths))
        x = x + _sinusoidal(x.shape[1], self.hidden_size, x.device, x.dtype)
        for block in self.blocks:
            x = block(x)
        return self._finish(self.norm(x), lengths)
