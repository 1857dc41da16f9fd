"""Re-rotating cached rotary-embedded keys to new positions.

Llama-family models apply the rotary position embedding (RoPE) to keys *before* they enter
the KV cache, so a cached key already carries its position. RoPE rotates each pair of
channels ``(j, j + head_dim/2)`` by the angle ``p * theta_j``; rotations compose, so moving a
cached key from slot ``p_old`` to slot ``p_new`` is one more rotation by
``delta = p_new - p_old``:

    k' = k * cos(delta * theta) + rotate_half(k) * sin(delta * theta)

This is what StreamingLLM and SirLLM need after evicting tokens: positions are the slots
inside the compacted cache, not the positions in the original stream.
"""

from __future__ import annotations

import torch

#: Llama-family model types whose attention rotates keys (rotate-half layout) before caching.
SUPPORTED_MODEL_TYPES = frozenset({"llama"})
#: RoPE variants with a fixed frequency vector and no amplitude scaling of cos/sin.
SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" in params:
        return str(params["rope_type"])
    scaling = getattr(config, "rope_scaling", None) or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_supported_model(model) -> None:
    """Raise ``ValueError`` unless ``model`` is a causal LM whose cache can be compacted.

    Supported: Llama-architecture models (``config.model_type == "llama"``, e.g. SmolLM2,
    Llama 2/3) with a static RoPE variant and no sliding-window layers.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"expected a Hugging Face model with a .config, got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); the fixed-budget "
            f"KV caches support model types {sorted(SUPPORTED_MODEL_TYPES)}, whose keys are "
            "cached after a rotate-half RoPE"
        )
    rope_type = _rope_type(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE variant {rope_type!r}; supported: {sorted(SUPPORTED_ROPE_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"sliding-window layers are not supported (layer_types={layer_types})")
    if getattr(getattr(model, "model", None), "rotary_emb", None) is None:
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb module")


def inverse_frequencies(model) -> torch.Tensor:
    """RoPE inverse frequencies ``theta``: (head_dim/2,) float32, from the model's rotary module."""
    check_supported_model(model)
    return model.model.rotary_emb.inv_freq.detach().to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the last dimension split in halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotation_cos_sin(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation by ``delta`` slots.

    Args:
        delta: (time,) integer position shifts.
        inv_freq: (head_dim/2,) RoPE inverse frequencies.

    Returns:
        ``(cos, sin)``, each (time, head_dim) float32; the angle is formed in float64 so that
        large shifts lose no precision before the float32 rotation.
    """
    if delta.dim() != 1:
        raise ValueError(f"delta must be (time,), got shape {tuple(delta.shape)}")
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be (head_dim/2,), got shape {tuple(inv_freq.shape)}")
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def rerotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate cached keys by ``delta`` positions (float32 arithmetic, result in the input dtype).

    Args:
        keys: (batch, kv_heads, time, head_dim) keys already rotated to their old positions.
        delta: (time,) ``new_slot - old_slot`` for every cached key.
        inv_freq: (head_dim/2,) RoPE inverse frequencies.

    Returns:
        (batch, kv_heads, time, head_dim) keys rotated to their new positions.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be (batch, kv_heads, time, head_dim), got {tuple(keys.shape)}")
    if delta.shape != (keys.shape[2],):
        raise ValueError(
            f"delta must be (time,) = ({keys.shape[2]},) to match keys, got {tuple(delta.shape)}"
        )
    if 2 * inv_freq.shape[0] != keys.shape[3]:
        raise ValueError(
            f"inv_freq has {inv_freq.shape[0]} entries but keys have head_dim {keys.shape[3]}"
        )
    cos, sin = rotation_cos_sin(delta.to(keys.device), inv_freq.to(keys.device))
    k32 = keys.to(torch.float32)
    out = k32 * cos + rotate_half(k32) * sin
    return out.to(keys.dtype)
