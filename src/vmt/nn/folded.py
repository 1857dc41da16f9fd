r"""Folded (segment-recurrent) transformer: folded context condensation.

A sequence of length ``L`` is cut into segments of length ``l``. A **local** stack of causal
transformer blocks reads each segment on its own (window ``l``). A **global** stack then
reads, for segment ``s``, the concatenation ``[C_{s-1} ; X_s]`` of the condensed states of
the previous segment and the local output of the current one, causally (window ``2l``).
The rows of ``C_{s-1}`` are themselves evolved by the global layers alongside ``X_s``, as
in the note's equation (17): at global layer ``i`` the previous segment is at depth
``N + i - 1`` while the current one is at depth ``i - 1``. The global output of segment
``s`` becomes its condensed state ``C_s``, which the next segment meets, and so on:
context is folded forward recursively, so it reaches arbitrarily far back while no
attention window exceeds ``2l`` and inference holds only one segment of carried state.

Shapes use the library vocabulary: inputs are token ids (batch, time) int64 or features
(batch, time, feat); outputs are (batch, time, hidden).
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
class FoldedTransformerConfig:
    """Hyperparameters of :class:`FoldedTransformer`.

    Attributes:
        segment_length: ``l``, tokens per segment (local window ``l``, global window ``2l``).
        d_model: hidden width.
        n_heads: attention heads (divides ``d_model``).
        d_ff: MLP width.
        n_local: causal blocks applied within each segment.
        n_global: blocks applied to ``[condensed previous segment ; segment]``.
        vocab_size: number of token ids for token input; exclusive with ``input_dim``.
        input_dim: width of feature-vector input (e.g. frozen LM features).
        grad_segments: truncated back-propagation through the carry. The carry entering
            segment ``s`` is detached whenever ``s`` is a multiple of ``grad_segments``, so the
            gradient of a loss on segment ``s`` reaches segments ``k * (s // k) .. s`` only
            (``k = grad_segments``; blocks of ``k`` segments, as in truncated BPTT); the
            forward pass is unchanged. ``None``: the full sequence.
        carry: if False, the global stack never sees the previous segment (global attention
            over the carry masked off): every segment is read on its own. For ablations/tests.
        refresh_memory: if True (the note's scheme), the carried rows pass through each global
            layer again together with the current segment; if False they enter every global
            layer unchanged (keys/values only).
        dropout: dropout inside the blocks.
    """

    segment_length: int = 16
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    n_local: int = 2
    n_global: int = 2
    vocab_size: int | None = None
    input_dim: int | None = None
    grad_segments: int | None = None
    carry: bool = True
    refresh_memory: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("segment_length", "d_model", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_local", "n_global"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.n_global < 1:
            raise ValueError(f"n_global must be at least 1 (it carries the context), got "
                             f"{self.n_global}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError(
                f"give exactly one of vocab_size and input_dim, got vocab_size="
                f"{self.vocab_size}, input_dim={self.input_dim}"
            )
        if self.grad_segments is not None and (
            not isinstance(self.grad_segments, int) or self.grad_segments < 1
        ):
            raise ValueError(f"grad_segments must be None or >= 1, got {self.grad_segments!r}")


@dataclass
class FoldedState:
    """What streaming carries from one segment to the next (constant size).

    Attributes:
        memory: (batch, memory, hidden) condensed states of the previous segment (residual
            stream after the global stack); ``memory`` is 0 before the first segment, else ``l``.
        memory_valid: (batch, memory) bool; False marks padding.
    """

    memory: Tensor
    memory_valid: Tensor

    def detach(self) -> FoldedState:
        return FoldedState(self.memory.detach(), self.memory_valid)

    def nbytes(self) -> int:
        """Bytes held by the carried tensors."""
        return sum(t.element_size() * t.numel() for t in (self.memory, self.memory_valid))


class FoldedTransformer(nn.Module):
    """Causal segment-recurrent transformer (folded context condensation).

    Call it on a whole sequence (``forward``), or stream it segment by segment (``step``),
    which gives the same outputs with memory independent of the sequence length.

    As a **reverse reader** (the VMT guide's ``h_k`` summarising ``y_k..y_n``) call
    ``forward(inputs, lengths, reverse=True)``: each row's valid prefix is read from its end
    backwards, and the outputs are put back in the original order, so ``out[b, k]`` depends
    exactly on ``inputs[b, k:lengths[b]]``.
    """

    def __init__(self, config: FoldedTransformerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embed = InputEmbedding(c.d_model, c.vocab_size, c.input_dim)
        self.local_blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_local)
        )
        self.local_bias = nn.ModuleList(
            RelativePositionBias(c.n_heads, c.segment_length) for _ in range(c.n_local)
        )
        self.global_blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_global)
        )
        self.global_bias = nn.ModuleList(
            RelativePositionBias(c.n_heads, 2 * c.segment_length) for _ in range(c.n_global)
        )
        self.norm = nn.LayerNorm(c.d_model)

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def segment_length(self) -> int:
        return self.config.segment_length

    # ------------------------------------------------------------------ pieces
    def initial_state(self, batch_size: int) -> FoldedState:
        """The empty carry before the first segment."""
        p = self.norm.weight
        return FoldedState(
            memory=p.new_zeros(batch_size, 0, self.config.d_model),
            memory_valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=p.device),
        )

    def _local(self, x: Tensor, valid: Tensor) -> Tensor:
        """x: (batch, n, hidden) with n <= l, one segment per row -> (batch, n, hidden)."""
        pos = torch.arange(x.shape[1], device=x.device)
        for block, rel in zip(self.local_blocks, self.local_bias, strict=True):
            x = block(x, rel(pos, pos, valid))
        return x

    def _global(self, x: Tensor, valid: Tensor, state: FoldedState) -> Tensor:
        """Global stack for one segment.

        Args:
            x: (batch, n, hidden) local output of the segment, n <= l.
            valid: (batch, n) bool.
            state: the carry of the previous segment.

        Returns:
            (batch, n, hidden) global output (residual stream) of the segment.
        """
        mem, mem_valid = state.memory, state.memory_valid
        m, n = mem.shape[1], x.shape[1]
        if not self.config.carry or m == 0:
            pos = torch.arange(n, device=x.device)
            for block, rel in zip(self.global_blocks, self.global_bias, strict=True):
                x = block(x, rel(pos, pos, valid))
            return x
        if self.config.refresh_memory:
            # One causal pass over [C_{s-1} ; X_s] (length m + n <= 2l): carried rows only see
            # carried rows (they are all in the past), current rows see all carried rows and
            # the current rows up to themselves.
            z = torch.cat([mem, x], dim=1)  # (batch, m + n, hidden)
            z_valid = torch.cat([mem_valid, valid], dim=1)
            pos = torch.arange(m + n, device=x.device)
            for block, rel in zip(self.global_blocks, self.global_bias, strict=True):
                z = block(z, rel(pos, pos, z_valid))
            return z[:, m:]
        # Carried rows are fixed keys/values at positions -m .. -1.
        q_pos = torch.arange(n, device=x.device)
        k_pos = torch.arange(-m, n, device=x.device)
        k_valid = torch.cat([mem_valid, valid], dim=1)
        for block, rel in zip(self.global_blocks, self.global_bias, strict=True):
            x = block(x, rel(q_pos, k_pos, k_valid), memory=mem)
        return x

    # ------------------------------------------------------------------ public API
    def forward(
        self, inputs: Tensor, lengths: Tensor | None = None, reverse: bool = False
    ) -> Tensor:
        """Read whole sequences.

        Args:
            inputs: (batch, time) int64 token ids, or (batch, time, feat) features.
            lengths: optional (batch,) int64 valid lengths (right padding); positions at or
                beyond a row's length never influence valid positions and are returned as 0.
            reverse: read each row's valid prefix backwards (see the class docstring).

        Returns:
            (batch, time, hidden) final-normed hidden states; ``time`` need not be a multiple
            of ``segment_length`` (the last segment is padded and masked internally).
        """
        inputs, valid = prepare_sequence(self.embed, inputs, lengths, reverse)
        l = self.config.segment_length  # noqa: E741
        x = self.embed(inputs)  # (batch, time, hidden)
        batch, time, d = x.shape
        x, seg_valid = split_segments(x, valid, l)
        n_seg = x.shape[1]
        # Local stack: all segments in parallel, (batch * segment, l, hidden).
        xs = self._local(x.reshape(batch * n_seg, l, d), seg_valid.reshape(batch * n_seg, l))
        xs = xs.view(batch, n_seg, l, d)
        # Global stack: sequential over segments through the carry.
        state = self.initial_state(batch)
        k = self.config.grad_segments
        outs = []
        for s in range(n_seg):
            if k is not None and s > 0 and s % k == 0:
                state = state.detach()
            out = self._global(xs[:, s], seg_valid[:, s], state)  # (batch, l, hidden)
            outs.append(out)
            state = FoldedState(out, seg_valid[:, s])
        h = self.norm(torch.cat(outs, dim=1)[:, :time])  # (batch, time, hidden)
        h = h * valid[..., None].to(h.dtype)
        if reverse:
            h = reverse_padded(h, lengths)
        return h

    def step(
        self, inputs: Tensor, state: FoldedState, lengths: Tensor | None = None
    ) -> tuple[Tensor, FoldedState]:
        """Stream one segment.

        Args:
            inputs: (batch, n) ids or (batch, n, feat) features of the next ``n <= l`` steps.
            state: carry from :meth:`initial_state` or a previous ``step``.
            lengths: optional (batch,) valid lengths within this segment.

        Returns:
            ``(hidden, next_state)``: hidden (batch, n, hidden) equals the corresponding rows
            of :meth:`forward` on the whole stream. If ``n == l`` the state advances; a
            partial segment (``n < l``) returns the input ``state`` unchanged, so the caller
            can call again with the completed segment (token-by-token generation).
        """
        l = self.config.segment_length  # noqa: E741
        n = check_step(self.embed, inputs, l, state.memory.shape[0])
        valid = valid_mask(lengths, inputs.shape[0], n, device=inputs.device)
        x = self._local(self.embed(inputs), valid)
        out = self._global(x, valid, state)
        h = self.norm(out) * valid[..., None].to(out.dtype)
        if n < l:
            return h, state
        return h, FoldedState(out, valid)
