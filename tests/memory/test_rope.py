import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vmt.hf_compat import cache_kwargs
from vmt.memory import KVStream, StreamingLLM, check_supported_model, inverse_frequencies
from vmt.memory.rope import rerotate_keys, rotation_cos_sin
from vmt.testing import tiny_llama


def _rope64(x, positions, inv_freq):
    """Independent float64 RoPE (rotate-half layout) at integer positions."""
    ang = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def test_rerotation_composes_with_rope_in_float64_oracle():
    model = tiny_llama()
    inv_freq = inverse_frequencies(model)
    raw = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    old = torch.tensor([0, 5, 9, 100, 2000, 4000])
    new = torch.tensor([0, 1, 2, 3, 4, 5])
    cached = _rope64(raw, old, inv_freq).float()
    moved = rerotate_keys(cached, new - old, inv_freq)
    # float32 rotation of O(1) entries: error ~ a few ulp of 1.0
    torch.testing.assert_close(moved.double(), _rope64(raw, new, inv_freq), atol=2e-6, rtol=0)


def test_rotation_by_zero_is_identity_and_shapes_checked():
    inv_freq = torch.rand(4)
    cos, sin = rotation_cos_sin(torch.zeros(3, dtype=torch.int64), inv_freq)
    assert torch.equal(cos, torch.ones(3, 8)) and torch.equal(sin, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="delta must be"):
        rerotate_keys(torch.zeros(1, 1, 3, 8), torch.zeros(4, dtype=torch.int64), inv_freq)
    with pytest.raises(ValueError, match="head_dim"):
        rerotate_keys(torch.zeros(1, 1, 3, 6), torch.zeros(3, dtype=torch.int64), inv_freq)


def _raw_keys(model, tokens):
    """Pre-RoPE keys of every layer, (1, kv_heads, time, head_dim), captured at k_proj."""
    captured = []
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda _m, _i, out: captured.append(
                out.view(1, -1, cfg.num_key_value_heads, head_dim).transpose(1, 2)
            )
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(tokens[None])
    finally:
        for h in hooks:
            h.remove()
    return captured


def _rerotation_vs_fresh(model, n_tokens, keep, next_token):
    """Logits of ``next_token`` after compaction (re-rotated) vs a cache built fresh at the
    new slots from the raw keys with the model's own rotary module."""
    tokens = torch.randint(0, model.config.vocab_size, (n_tokens,))
    stream = KVStream(model, StreamingLLM(budget=10_000), chunk_size=n_tokens)
    stream.feed(tokens)
    values = [layer.values for layer in stream.state.cache.layers]
    stream.state.select(keep, stream._inv_freq)
    got = stream.feed(torch.tensor([next_token]), return_logits=True).logits[0]

    raw = _raw_keys(model, tokens)
    slots = torch.arange(keep.numel())[None]
    cos, sin = model.model.rotary_emb(raw[0], position_ids=slots)
    fresh = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(raw, values, strict=True)):
        k_new, _ = apply_rotary_pos_emb(k[:, :, keep], k[:, :, keep], cos, sin)
        fresh.update(k_new, v[:, :, keep], i)
    with torch.no_grad():
        want = model(torch.tensor([[next_token]]), **cache_kwargs(model, fresh)).logits[0, 0]
    naive = DynamicCache(config=model.config)  # moved without re-rotation: must differ
    for i, (k, v) in enumerate(zip(raw, values, strict=True)):
        k_old, _ = apply_rotary_pos_emb(k, k, *model.model.rotary_emb(k, torch.arange(n_tokens)[None]))
        naive.update(k_old[:, :, keep], v[:, :, keep], i)
    with torch.no_grad():
        wrong = model(torch.tensor([[next_token]]), **cache_kwargs(model, naive)).logits[0, 0]
    return got, want, wrong


def test_rerotated_cache_matches_fresh_forward_at_new_positions():
    model = tiny_llama(hidden_size=64, num_heads=4, num_kv_heads=2)
    keep = torch.tensor([0, 1, 2, 3, 17, 30, 31, 50, 59])
    got, want, wrong = _rerotation_vs_fresh(model, 60, keep, next_token=5)
    # float32 logits of O(1): the acceptance tolerance 1e-4 leaves ~100x float32 headroom
    assert (got - want).abs().max() <= 1e-4
    assert (wrong - want).abs().max() > 1e-3  # the check can fail: skipping rotation is caught


@pytest.mark.lm
def test_rerotation_on_smollm2(smollm2):
    model, _ = smollm2
    keep = torch.cat([torch.arange(4), torch.arange(40, 64)])
    got, want, wrong = _rerotation_vs_fresh(model, 64, keep, next_token=1000)
    # same acceptance bound on the real model (30 float32 layers)
    assert (got - want).abs().max() <= 1e-4
    assert (wrong - want).abs().max() > 1e-2


def test_unsupported_architecture_and_rope_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        check_supported_model(gpt2)
    with pytest.raises(ValueError, match="unsupported architecture"):
        KVStream(gpt2, StreamingLLM(16))
    with pytest.raises(ValueError, match="expected a Hugging Face model"):
        check_supported_model(torch.nn.Linear(2, 2))
    model = tiny_llama()
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "dynamic"}
    with pytest.raises(ValueError, match="unsupported RoPE variant 'dynamic'"):
        check_supported_model(model)
