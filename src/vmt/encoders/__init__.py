"""Encoders: features of a pretrained LM read in reverse, their cache, LoRA, small readers."""

from vmt.encoders.cache import FeatureCache, plan_windows
from vmt.encoders.features import LMFeatureExtractor, flip_within_lengths
from vmt.encoders.lora import LoRAConfig, LoRALinear, add_lora, lora_parameters, merge_lora
from vmt.encoders.pretrained import load_pretrained_lm
from vmt.encoders.small_readers import GRUReader, TransformerReader

__all__ = [
    "FeatureCache",
    "GRUReader",
    "LMFeatureExtractor",
    "LoRAConfig",
    "LoRALinear",
    "TransformerReader",
    "add_lora",
    "flip_within_lengths",
    "load_pretrained_lm",
    "lora_parameters",
    "merge_lora",
    "plan_windows",
]
