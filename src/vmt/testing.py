"""Small, seeded stand-ins for tests and examples: tiny random Llama models."""

from __future__ import annotations

import torch


def tiny_llama(
    vocab_size: int = 97,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 4096,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised ``LlamaForCausalLM`` with the same code path as SmolLM2.

    Small enough to run hundreds of forward passes in a unit test.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model
