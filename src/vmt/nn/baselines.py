"""Baselines for the folded transformer, built from the same blocks.

* :func:`windowed_transformer`: a plain causal transformer whose every layer attends to the
  last ``2l`` positions (sliding window ``2l``); its reach grows by ``2l - 1`` per layer and
  then stops.
* :func:`segment_cache_transformer`: Transformer-XL style; the sequence is read in segments
  of ``l`` and each layer also attends to the cached (stop-gradient) layer input of the
  previous segment.

Both are instances of :class:`SegmentCacheTransformer`: a stack of
:class:`~vmt.nn.blocks.TransformerBlock` where, at every layer, segment ``s`` attends to the
layer inputs of the previous ``cache_segments`` segments plus itself, within a window of
offsets ``< window``. With ``n_layers = n_local + n_global`` and the same width they have the
parameter count of a :class:`~vmt.nn.folded.FoldedTransformer` up to the position-bias tables.
Unlike the folded model, no layer is recurrent across segments, so the full-sequence forward
runs all segments in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vmt.nn.blocks import (
    InputEmbedding,
    RelativePositionBias,
    TransformerBlock,
    check_step,
    prepare_sequence,
    reverse_padded,
    split_segments,
    valid_mask,
)


@dataclass(frozen=True)
class SegmentCacheConfig:
    """Hyperparameters of :class:`SegmentCacheTransformer`.

    Attributes:
        segment_length: ``l``, tokens per segment.
        cache_segments: previous segments each layer can attend to (1 or 2).
        window: largest query-key offset plus one; at most ``(cache_segments + 1) * l``.
        detach_cache: stop the gradient through the cached segments (Transformer-XL).
        d_model, n_heads, d_ff, n_layers, dropout: the block stack.
        vocab_size / input_dim: token-id or feature input (exactly one).
    """

    segment_length: int = 16
    cache_segments: int = 2
    window: int = 32
    detach_cache: bool = False
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    n_layers: int = 4
    vocab_size: int | None = None
    input_dim: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("segment_length", "d_model", "n_heads", "d_ff", "n_layers", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.cache_segments, int) or self.cache_segments < 0:
            raise ValueError(f"cache_segments must be >= 0, got {self.cache_segments!r}")
        if self.window > (self.cache_segments + 1) * self.segment_length:
            raise ValueError(
                f"window={self.window} needs more than cache_segments={self.cache_segments} "
                f"segments of length {self.segment_length}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError(
                f"give exactly one of vocab_size and input_dim, got vocab_size="
                f"{self.vocab_size}, input_dim={self.input_dim}"
            )


@dataclass
class CacheState:
    """Per-layer cache for streaming: layer inputs of the last ``cache_segments`` segments.

    Attributes:
        memory: list over layers of (batch, memory, hidden).
        memory_valid: (batch, memory) bool.
    """

    memory: list[Tensor]
    memory_valid: Tensor

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in [*self.memory, self.memory_valid])


class SegmentCacheTransformer(nn.Module):
    """Causal transformer with a per-layer cache of the previous segments.

    Same interface as :class:`~vmt.nn.folded.FoldedTransformer`: ``forward(inputs, lengths,
    reverse)`` and streaming ``initial_state`` / ``step``.
    """

    def __init__(self, config: SegmentCacheConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embed = InputEmbedding(c.d_model, c.vocab_size, c.input_dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers)
        )
        self.bias = nn.ModuleList(
            RelativePositionBias(c.n_heads, c.window) for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model)

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def segment_length(self) -> int:
        return self.config.segment_length

    def initial_state(self, batch_size: int) -> CacheState:
        p = self.norm.weight
        return CacheState(
            memory=[p.new_zeros(batch_size, 0, self.config.d_model) for _ in self.blocks],
            memory_valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=p.device),
        )

    def forward(
        self, inputs: Tensor, lengths: Tensor | None = None, reverse: bool = False
    ) -> Tensor:
        """Read whole sequences.

        Args:
            inputs: (batch, time) int64 ids or (batch, time, feat) features.
            lengths: optional (batch,) valid lengths; padded outputs are 0.
            reverse: read each row's valid prefix backwards and return outputs in the
                original order (``out[b, k]`` summarises ``inputs[b, k:lengths[b]]`` within
                the model's reach).

        Returns:
            (batch, time, hidden).
        """
        c = self.config
        l, m = c.segment_length, c.cache_segments  # noqa: E741
        inputs, valid = prepare_sequence(self.embed, inputs, lengths, reverse)
        x = self.embed(inputs)
        batch, time, d = x.shape
        x, seg_valid = split_segments(x, valid, l)
        n_seg = x.shape[1]

        def previous(t: Tensor) -> Tensor:
            # (batch, segment, l, ...) -> (batch, segment, m*l, ...): segments s-m .. s-1,
            # zero-filled (and marked invalid) before the start.
            front = t.new_zeros(batch, m, *t.shape[2:])
            padded = torch.cat([front, t], dim=1)
            return torch.cat([padded[:, j : j + n_seg] for j in range(m)], dim=2)

        k_valid = seg_valid.reshape(batch * n_seg, l)
        if m:
            mem_valid = previous(seg_valid).reshape(batch * n_seg, m * l)
            k_valid = torch.cat([mem_valid, k_valid], dim=1)
        q_pos = torch.arange(l, device=x.device)
        k_pos = torch.arange(-m * l, l, device=x.device)
        for block, rel in zip(self.blocks, self.bias, strict=True):
            mem = None
            if m:
                mem = previous(x).reshape(batch * n_seg, m * l, d)  # segments s-m .. s-1
                if c.detach_cache:
                    mem = mem.detach()
            out = block(x.reshape(batch * n_seg, l, d), rel(q_pos, k_pos, k_valid), memory=mem)
            x = out.view(batch, n_seg, l, d)
        h = self.norm(x.reshape(batch, n_seg * l, d)[:, :time])
        h = h * valid[..., None].to(h.dtype)
        if reverse:
            h = reverse_padded(h, lengths)
        return h

    def step(
        self, inputs: Tensor, state: CacheState, lengths: Tensor | None = None
    ) -> tuple[Tensor, CacheState]:
        """Stream one segment (``n <= l`` steps); a partial segment leaves ``state`` as is.

        Returns:
            ``(hidden (batch, n, hidden), next_state)``.
        """
        c = self.config
        l = c.segment_length  # noqa: E741
        n = check_step(self.embed, inputs, l, state.memory_valid.shape[0])
        valid = valid_mask(lengths, inputs.shape[0], n, device=inputs.device)
        x = self.embed(inputs)
        mlen = state.memory_valid.shape[1]
        q_pos = torch.arange(n, device=x.device)
        k_pos = torch.arange(-mlen, n, device=x.device)
        k_valid = torch.cat([state.memory_valid, valid], dim=1)
        keep = c.cache_segments * l
        new_memory = []
        for block, rel, mem in zip(self.blocks, self.bias, state.memory, strict=True):
            new_memory.append(torch.cat([mem, x], dim=1)[:, -keep:] if keep else mem)
            x = block(x, rel(q_pos, k_pos, k_valid), memory=mem)
        h = self.norm(x) * valid[..., None].to(x.dtype)
        if n < l:
            return h, state
        new_valid = torch.cat([state.memory_valid, valid], dim=1)[:, -keep:] if keep else (
            state.memory_valid
        )
        if c.detach_cache:
            new_memory = [t.detach() for t in new_memory]
        return h, CacheState(new_memory, new_valid)


def windowed_transformer(
    segment_length: int = 16, n_layers: int = 4, **kwargs
) -> SegmentCacheTransformer:
    """Plain causal transformer with sliding window ``2 * segment_length`` in every layer."""
    return SegmentCacheTransformer(
        SegmentCacheConfig(
            segment_length=segment_length,
            cache_segments=2,
            window=2 * segment_length,
            detach_cache=False,
            n_layers=n_layers,
            **kwargs,
        )
    )


def segment_cache_transformer(
    segment_length: int = 16, n_layers: int = 4, **kwargs
) -> SegmentCacheTransformer:
    """Transformer-XL style: each layer also sees the stop-gradient previous segment."""
    return SegmentCacheTransformer(
        SegmentCacheConfig(
            segment_length=segment_length,
            cache_segments=1,
            window=2 * segment_length,
            detach_cache=True,
            n_layers=n_layers,
            **kwargs,
        )
    )
