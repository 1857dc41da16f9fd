"""Shared transformer pieces: a pre-norm attention + MLP block and relative position biases.

All stacks in :mod:`vmt.nn` (folded, windowed, segment-cache) are built from
:class:`TransformerBlock`, so that parameter counts can be matched exactly. Positions enter
only through a learned per-head bias on the query-key offset (:class:`RelativePositionBias`),
which lets the same block work on a segment, on ``[memory ; segment]`` and on a sliding
window without absolute position embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class RelativePositionBias(nn.Module):
    """A learned additive attention bias per head and per offset ``query_pos - key_pos``.

    Offsets outside ``[0, window)`` (the future, or too far back) are masked with ``-inf``;
    so are keys flagged invalid (padding), except a query's own position, so that no row of
    the attention matrix is empty.

    Args:
        n_heads: number of attention heads.
        window: number of offsets a query may see (``0 .. window-1``).
    """

    def __init__(self, n_heads: int, window: int) -> None:
        super().__init__()
        _check_positive("n_heads", n_heads)
        _check_positive("window", window)
        self.n_heads = n_heads
        self.window = window
        self.table = nn.Parameter(torch.zeros(n_heads, window))

    def forward(
        self, query_pos: Tensor, key_pos: Tensor, key_valid: Tensor | None = None
    ) -> Tensor:
        """Additive attention mask.

        Args:
            query_pos: (query,) int64 positions of the queries.
            key_pos: (key,) int64 positions of the keys.
            key_valid: optional (batch, key) bool; False marks padding.

        Returns:
            (batch or 1, head, query, key) float bias, ``-inf`` where attention is not allowed.
        """
        offsets = query_pos[:, None] - key_pos[None, :]  # (query, key)
        allowed = (offsets >= 0) & (offsets < self.window)
        bias = self.table[:, offsets.clamp(0, self.window - 1)]  # (head, query, key)
        allowed = allowed[None]  # (1, query, key)
        if key_valid is not None:
            own = offsets == 0
            allowed = allowed & (key_valid[:, None, :] | own[None])  # (batch, query, key)
        neg = torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device)
        return torch.where(allowed[:, None], bias[None], neg)


class TransformerBlock(nn.Module):
    """Pre-norm multi-head attention + GELU MLP, with an optional memory prefix.

    The queries are the rows of ``x``; the keys and values are ``[memory ; x]`` (both passed
    through the same layer norm), so one block serves plain self-attention, a memory-augmented
    segment (Transformer-XL style) and the folded global stack.

    Args:
        d_model: width of the residual stream (hidden).
        n_heads: attention heads; must divide ``d_model``.
        d_ff: width of the MLP.
        dropout: dropout on attention output and MLP output (0 disables it).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive("d_model", d_model)
        _check_positive("n_heads", n_heads)
        _check_positive("d_ff", d_ff)
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t: Tensor) -> Tensor:
        batch, n, _ = t.shape
        return t.view(batch, n, self.n_heads, -1).transpose(1, 2)  # (batch, head, n, d_head)

    def forward(self, x: Tensor, bias: Tensor, memory: Tensor | None = None) -> Tensor:
        """One block.

        Args:
            x: (batch, query, hidden) residual stream of the queries.
            bias: (batch or 1, head, query, key) additive mask with ``key = memory + query``.
            memory: optional (batch, memory, hidden) residual stream of extra keys/values
                placed before ``x``.

        Returns:
            (batch, query, hidden).
        """
        h = self.norm1(x)
        kv_in = h if memory is None else torch.cat([self.norm1(memory), h], dim=1)
        n_keys = kv_in.shape[1]
        if bias.shape[-2:] != (x.shape[1], n_keys):
            raise ValueError(
                f"bias has shape {tuple(bias.shape)}, expected (..., {x.shape[1]}, {n_keys})"
            )
        q = self._heads(self.query(h))
        k, v = (self._heads(t) for t in self.key_value(kv_in).chunk(2, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        a = a.transpose(1, 2).reshape(x.shape)  # (batch, query, hidden)
        x = x + self.dropout(self.out(a))
        return x + self.dropout(self.mlp(self.norm2(x)))


class InputEmbedding(nn.Module):
    """Token ids (``vocab_size``) or feature vectors (``input_dim``) to the residual stream.

    Exactly one of ``vocab_size`` and ``input_dim`` is given.
    """

    def __init__(self, d_model: int, vocab_size: int | None, input_dim: int | None) -> None:
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(
                f"give exactly one of vocab_size and input_dim, got vocab_size={vocab_size}, "
                f"input_dim={input_dim}"
            )
        self.vocab_size = vocab_size
        self.input_dim = input_dim
        if vocab_size is not None:
            _check_positive("vocab_size", vocab_size)
            self.embed: nn.Module = nn.Embedding(vocab_size, d_model)
        else:
            _check_positive("input_dim", input_dim)
            self.embed = nn.Linear(input_dim, d_model)

    def check(self, inputs: Tensor) -> None:
        """Raise ``ValueError`` unless ``inputs`` is (batch, time) ids or (batch, time, feat)."""
        if self.vocab_size is not None:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"expected token ids (batch, time) int64, got shape {tuple(inputs.shape)} "
                    f"dtype {inputs.dtype}"
                )
            if inputs.numel() and (inputs.min() < 0 or inputs.max() >= self.vocab_size):
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}), got range "
                    f"[{int(inputs.min())}, {int(inputs.max())}]"
                )
        else:
            if inputs.dim() != 3 or inputs.shape[-1] != self.input_dim:
                raise ValueError(
                    f"expected features (batch, time, {self.input_dim}), got shape "
                    f"{tuple(inputs.shape)}"
                )
            if not inputs.is_floating_point():
                raise ValueError(f"features must be floating point, got dtype {inputs.dtype}")

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs: (batch, time) int64 or (batch, time, feat) -> (batch, time, hidden)."""
        self.check(inputs)
        if self.input_dim is not None:
            inputs = inputs.to(self.embed.weight.dtype)
        return self.embed(inputs)


def valid_mask(lengths: Tensor | None, batch: int, time: int, device=None) -> Tensor:
    """(batch, time) bool: True at positions ``t < lengths[b]``; all True when lengths is None."""
    if lengths is None:
        return torch.ones(batch, time, dtype=torch.bool, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.numel() and (lengths.min() < 1 or lengths.max() > time):
        raise ValueError(
            f"lengths must lie in [1, {time}], got range [{int(lengths.min())}, "
            f"{int(lengths.max())}]"
        )
    return torch.arange(time, device=device)[None, :] < lengths[:, None]


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each row's valid prefix ``x[b, :lengths[b]]`` in time; padding stays in place.

    Args:
        x: (batch, time, ...) any tensor.
        lengths: (batch,) int64, or None for all rows of full length.

    Returns:
        Same shape; applying it twice gives back ``x``.
    """
    batch, time = x.shape[:2]
    t = torch.arange(time, device=x.device)[None, :].expand(batch, time)
    if lengths is None:
        idx = time - 1 - t
    else:
        lengths = torch.as_tensor(lengths, device=x.device)[:, None]
        idx = torch.where(t < lengths, lengths - 1 - t, t)
    idx = idx.view(batch, time, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


# -------------------------------------------------------------- segment plumbing of the stacks
def prepare_sequence(
    embed: InputEmbedding, inputs: Tensor, lengths: Tensor | None, reverse: bool
) -> tuple[Tensor, Tensor]:
    """Check ``inputs`` (batch, time[, feat]) for a whole-sequence read; returns the inputs
    (each row's valid prefix reversed when ``reverse``) and the (batch, time) valid mask."""
    embed.check(inputs)
    batch, time = inputs.shape[:2]
    if time < 1:
        raise ValueError(f"inputs must have at least one time step, got shape {tuple(inputs.shape)}")
    valid = valid_mask(lengths, batch, time, device=inputs.device)
    if reverse:
        inputs = reverse_padded(inputs, lengths)
    return inputs, valid


def split_segments(x: Tensor, valid: Tensor, segment_length: int) -> tuple[Tensor, Tensor]:
    """(batch, time, hidden) and (batch, time) -> (batch, segment, l, hidden) and
    (batch, segment, l): the last segment padded with zeros marked invalid."""
    batch, time, d = x.shape
    n_seg = -(-time // segment_length)
    pad = n_seg * segment_length - time
    if pad:
        x = torch.cat([x, x.new_zeros(batch, pad, d)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(batch, pad)], dim=1)
    return x.view(batch, n_seg, segment_length, d), valid.view(batch, n_seg, segment_length)


def check_step(embed: InputEmbedding, inputs: Tensor, segment_length: int, state_batch: int) -> int:
    """Check the inputs of one streaming step (``1 <= n <= l`` steps, the state's batch);
    returns ``n``."""
    embed.check(inputs)
    batch, n = inputs.shape[:2]
    if not 1 <= n <= segment_length:
        raise ValueError(
            f"a step takes 1 to {segment_length} time steps, got shape {tuple(inputs.shape)}"
        )
    if state_batch != batch:
        raise ValueError(f"state has batch {state_batch}, inputs have batch {batch}")
    return n
