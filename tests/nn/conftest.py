"""An independent dense reference for the blocks: explicit float64 attention with a mask."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F


def ref_block(block, table, queries, keys, offsets, allowed):
    """One pre-norm block written out by hand.

    table: (head, window) relative bias; queries: (batch, q, hidden); keys: (batch, k, hidden) residual streams (keys include the
    queries' own rows where they attend to themselves); offsets: (q, k) int64 query-key
    position offsets; allowed: (batch, q, k) bool.
    """
    ln1 = block.norm1
    hq = F.layer_norm(queries, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
    hk = F.layer_norm(keys, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
    heads = block.n_heads
    d = queries.shape[-1]
    dh = d // heads
    wq, bq = block.query.weight, block.query.bias
    wkv, bkv = block.key_value.weight, block.key_value.bias
    q = hq @ wq.T + bq
    k = hk @ wkv[:d].T + bkv[:d]
    v = hk @ wkv[d:].T + bkv[d:]
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5
        scores = scores + table[h][offsets.clamp(0, table.shape[1] - 1)]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    x = queries + out @ block.out.weight.T + block.out.bias
    ln2 = block.norm2
    h2 = F.layer_norm(x, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
    lin1, lin2 = block.mlp[0], block.mlp[2]
    return x + F.gelu(h2 @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias


def ref_layer(block, rel, queries, keys, q_pos, k_pos, key_valid):
    """Block + relative bias: causal within ``rel.window``, invalid keys masked (not self)."""
    offsets = q_pos[:, None] - k_pos[None, :]
    allowed = (offsets >= 0) & (offsets < rel.window)
    allowed = allowed[None] & (key_valid[:, None, :] | (offsets == 0)[None])
    return ref_block(block, rel.table, queries, keys, offsets, allowed)


def ref_stack(blocks, rels, x, valid):
    """Plain causal stack over x (batch, time, hidden) with positions 0..time-1."""
    pos = torch.arange(x.shape[1])
    for block, rel in zip(blocks, rels, strict=True):
        x = ref_layer(block, rel, x, x, pos, pos, valid)
    return x


@pytest.fixture
def ref():
    return SimpleNamespace(layer=ref_layer, stack=ref_stack)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which on a
    busy machine costs far more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
