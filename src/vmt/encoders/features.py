"""Features of a pretrained causal LM that reads the text in reverse (or forward).

The guide of the VMT needs, at every position ``k``, a vector ``h_k`` that summarises the rest
of the text ``y_k .. y_n``. A causal LM gives exactly that if it reads the sequence backwards:
:class:`LMFeatureExtractor` flips each row within its length, runs the first ``layer``
transformer blocks, and flips the outputs back so that ``features[b, k]`` sits at the position
of the token it ends on. In ``"forward"`` direction (used by the reverse VMT) it is the plain
causal reading, ``features[b, k]`` summarising ``y_1 .. y_k``.

Rows are right-padded; since the reading is causal, padding never reaches a valid position,
and the outputs at padding positions are set to zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Literal

import torch
from torch import nn

from vmt.encoders.lora import LoRAConfig, add_lora, lora_parameters
from vmt.hf_compat import cache_keyword

__all__ = [
    "LMFeatureExtractor",
    "check_lengths",
    "encoder_autocast",
    "flip_within_lengths",
    "length_mask",
]

Direction = Literal["reverse", "forward"]
Trainable = Literal["frozen", "full", "lora"]


def check_lengths(batch: int, time: int, lengths: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``lengths`` is a ``(batch,)`` int64 tensor in ``[1, time]``."""
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must be ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype != torch.int64:
        raise ValueError(f"lengths must be int64, got {lengths.dtype}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > time):
        raise ValueError(
            f"lengths must lie in [1, {time}], got min {int(lengths.min())} "
            f"max {int(lengths.max())}"
        )


def length_mask(lengths: torch.Tensor, time: int) -> torch.Tensor:
    """``(batch, time)`` bool, True where ``k < lengths[b]``."""
    return torch.arange(time, device=lengths.device)[None, :] < lengths[:, None]


def flip_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row of ``x`` within its length; padding positions get index 0's value.

    ``out[b, j] = x[b, lengths[b] - 1 - j]`` for ``j < lengths[b]``; the map is its own
    inverse on valid positions. Positions ``j >= lengths[b]`` hold ``x[b, 0]`` (callers mask
    them).

    Args:
        x: ``(batch, time)`` or ``(batch, time, feature)``.
        lengths: ``(batch,)`` int64.
    """
    batch, time = x.shape[:2]
    ar = torch.arange(time, device=x.device)[None, :]
    idx = (lengths[:, None].to(x.device) - 1 - ar).clamp(min=0)  # (batch, time)
    if x.dim() == 3:
        idx = idx[:, :, None].expand(batch, time, x.shape[2])
    return x.gather(1, idx)


def encoder_autocast(device: torch.device | str, enabled: bool | None = None):
    """bf16 autocast for a (frozen) encoder: on by default on CUDA, off on CPU.

    The probabilistic parts of a VMT run outside it, in the model's dtype.
    """
    device = torch.device(device)
    if enabled is None:
        enabled = device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _config_hash(config: Any) -> str:
    """sha256 of a Hugging Face config without machine- or version-specific fields."""
    d = config.to_dict()
    drop = {"transformers_version", "_name_or_path", "name_or_path", "_commit_hash"}
    d = {k: v for k, v in d.items() if k not in drop and not k.startswith("_")}
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_digest(module: nn.Module, samples: int = 16) -> str:
    """sha256 of a few evenly spaced values of every tensor (cheap; catches other weights)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:".encode())
            if flat.numel():
                m = min(samples, flat.numel())
                idx = torch.arange(m) * (flat.numel() - 1) // max(m - 1, 1)
                h.update(flat[idx].double().cpu().numpy().tobytes())
    return h.hexdigest()


class LMFeatureExtractor(nn.Module):
    """Hidden states of the first ``layer`` blocks of a causal LM, read in reverse or forward.

    Only the first ``layer`` blocks run (the rest of the model is never evaluated). With
    ``layer=-1`` (or the number of blocks) all blocks run and the final norm is applied, which
    matches Hugging Face's last ``output_hidden_states`` entry; otherwise the output equals
    ``output_hidden_states[layer]`` of the full model.

    Args:
        model: a Hugging Face causal LM of the Llama family (its decoder must expose
            ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``).
        layer: number of transformer blocks to run, in ``1..num_layers``, or -1 for all.
        direction: ``"reverse"`` (``features[b, k]`` summarises ``tokens[b, k:len_b]``) or
            ``"forward"`` (``features[b, k]`` summarises ``tokens[b, :k+1]``).
        trainable: ``"frozen"`` (no gradients, LM kept in eval mode), ``"full"`` (every LM
            parameter trains) or ``"lora"`` (adapters on the attention q/v projections; the
            LM is modified in place and only adapter parameters train).
        model_name: identifies the weights in :attr:`fingerprint` (e.g. the hub id).
        lora: adapter hyperparameters when ``trainable="lora"``.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int = -1,
        direction: Direction = "reverse",
        trainable: Trainable = "frozen",
        model_name: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        if direction not in ("reverse", "forward"):
            raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
        if trainable not in ("frozen", "full", "lora"):
            raise ValueError(f"trainable must be 'frozen', 'full' or 'lora', got {trainable!r}")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        missing = [
            a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, a)
        ]
        if missing:
            raise ValueError(
                f"{type(model).__name__} has no decoder with {missing}; LMFeatureExtractor "
                "supports Llama-family causal LMs"
            )
        num_layers = len(decoder.layers)
        if layer == -1:
            layer = num_layers
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer must be in 1..{num_layers} or -1, got {layer}")
        self.lm = model
        self.config = model.config
        self.layer = layer
        self.num_layers = num_layers
        self.direction: Direction = direction
        self.trainable: Trainable = trainable
        self.model_name = model_name or str(getattr(self.config, "_name_or_path", "") or "lm")
        self._config_hash = _config_hash(self.config)
        if trainable == "lora":
            add_lora(model, lora or LoRAConfig())
        elif trainable == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        self._frozen_digest = _weights_digest(model) if trainable == "frozen" else None

    @property
    def decoder(self) -> nn.Module:
        """The transformer stack of the LM (embeddings, blocks, final norm)."""
        return self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm

    @property
    def hidden_size(self) -> int:
        """Size of a feature vector."""
        return int(self.config.hidden_size)

    @property
    def fingerprint(self) -> str:
        """Model name, config hash, weights digest, layer, direction and trainable mode.

        The weights digest samples a few values of every tensor, so differently initialised
        or fine-tuned weights under one name get different fingerprints.
        """
        digest = self._frozen_digest or _weights_digest(self.lm)
        return (
            f"{self.model_name}|config={self._config_hash[:16]}|weights={digest[:16]}"
            f"|layer={self.layer}/{self.num_layers}|{self.direction}|{self.trainable}"
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update (empty when frozen)."""
        if self.trainable == "lora":
            return list(lora_parameters(self.lm))
        return [p for p in self.lm.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> LMFeatureExtractor:
        super().train(mode)
        if self.trainable == "frozen":
            self.lm.eval()
        return self

    def _run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Causal reading of right-padded rows: ``(batch, time)`` -> ``(batch, time, hidden)``."""
        from transformers import masking_utils

        decoder = self.decoder
        hidden = decoder.embed_tokens(tokens)
        position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        mask_args = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": None,
            "position_ids": position_ids,
            cache_keyword(masking_utils.create_causal_mask): None,
        }
        layer_types = getattr(self.config, "layer_types", None)
        masks: dict[str, Any] = {}
        for i, block in enumerate(decoder.layers[: self.layer]):
            kind = layer_types[i] if layer_types else "full_attention"
            if kind not in masks:
                if kind == "sliding_attention":
                    masks[kind] = masking_utils.create_sliding_window_causal_mask(**mask_args)
                else:
                    masks[kind] = masking_utils.create_causal_mask(**mask_args)
            out = block(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        if self.layer == self.num_layers:
            hidden = decoder.norm(hidden)
        return hidden

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Features of right-padded token rows.

        Args:
            tokens: ``(batch, time)`` int64; entries at ``k >= lengths[b]`` are ignored.
            lengths: ``(batch,)`` int64 in ``[1, time]``.

        Returns:
            ``(batch, time, hidden)``: in reverse mode ``features[b, k]`` summarises
            ``tokens[b, k:lengths[b]]``; in forward mode ``tokens[b, :k+1]``. Zero at padding.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got {tuple(tokens.shape)}")
        if tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64, got {tokens.dtype}")
        batch, time = tokens.shape
        check_lengths(batch, time, lengths)
        lengths = lengths.to(tokens.device)
        span = int(lengths.max())
        valid = length_mask(lengths, span)
        rows = tokens[:, :span].masked_fill(~valid, 0)
        if self.direction == "reverse":
            rows = flip_within_lengths(rows, lengths).masked_fill(~valid, 0)
        grad = torch.no_grad() if self.trainable == "frozen" else contextlib.nullcontext()
        with grad:
            hidden = self._run_blocks(rows)
            if self.direction == "reverse":
                hidden = flip_within_lengths(hidden, lengths)
            hidden = hidden * valid[:, :, None].to(hidden.dtype)
            if span < time:
                hidden = nn.functional.pad(hidden, (0, 0, 0, time - span))
        return hidden

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, layer={self.layer}/{self.num_layers}, "
            f"direction={self.direction!r}, trainable={self.trainable!r}"
        )
