"""Checkpoints: safetensors for tensors, JSON for everything else — never pickle.

A checkpoint is a folder::

    checkpoint.json        format version, VMTConfig, reader spec, training config and state
    model.safetensors      the VMT's state dict
    optimizer.safetensors  the optimiser's tensors (its scalars are in the JSON)
    state.safetensors      random-number-generator states and carried latent states

Folders are written to a temporary sibling and renamed into place, so an interrupted save
never leaves a half-written checkpoint where the last good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vmt.models.config import VMTConfig

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    vmt: torch.nn.Module | None
    meta: dict
    optimizer_state: dict | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    vmt,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    meta: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format_version": FORMAT_VERSION,
        "vmt_config": vmt.config.to_dict(),
        "reader": getattr(vmt, "reader_spec", None),
        **(meta or {}),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in vmt.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if optimizer is not None:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            record["optimizer"] = opt_meta
        save_file({k: v.contiguous() for k, v in (tensors or {}).items()}, str(tmp / "state.safetensors"))
        (tmp / "checkpoint.json").write_text(json.dumps(record, indent=1, default=_json_default))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def read_meta(path: str | Path) -> dict:
    """The JSON part of a checkpoint, with clear errors for missing or corrupt files."""
    path = Path(path)
    meta_file = path / "checkpoint.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a vmt checkpoint (no checkpoint.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt checkpoint {path}: checkpoint.json is not valid JSON ({err})") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {meta.get('format_version')!r}; "
            f"this vmt reads version {FORMAT_VERSION}"
        )
    return meta


def read_meta_for(path: str | Path, config: VMTConfig) -> dict:
    """:func:`read_meta`, refusing a checkpoint written for another model config (resume)."""
    meta = read_meta(path)
    if meta["vmt_config"] != config.to_dict():
        raise ValueError(
            f"checkpoint {path} was written for a different model config; "
            "use another checkpoint folder or the same config"
        )
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint file {file}: {err}") from err


def load_state_into(vmt, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Load a state dict, naming every missing, unexpected or mis-shaped entry."""
    own = vmt.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where} does not fit this model (incompatible config): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    vmt.load_state_dict(state)


def load_checkpoint(
    path: str | Path, reader: torch.nn.Module | None = None, build_model: bool = True
) -> Checkpoint:
    """Rebuild the VMT of a checkpoint (config from JSON, weights from safetensors).

    With ``build_model=False`` only the stored tensors are returned (``model_state``), in
    their stored dtype, e.g. to load them into an existing float64 model.
    """
    from vmt.models.vmt import VariationalMarkovTransformer

    path = Path(path)
    meta = read_meta(path)
    config = VMTConfig.from_dict(meta["vmt_config"])
    state = _load_tensors(path / "model.safetensors")
    vmt = None
    if build_model:
        vmt = VariationalMarkovTransformer(config, reader=reader, reader_spec=None if reader else meta.get("reader"))
        load_state_into(vmt, state, f"checkpoint {path}")
    optimizer_state = None
    if "optimizer" in meta:
        optimizer_state = _unflatten_optimizer(_load_tensors(path / "optimizer.safetensors"), meta["optimizer"])
    tensors = _load_tensors(path / "state.safetensors") if (path / "state.safetensors").exists() else {}
    return Checkpoint(vmt=vmt, meta=meta, optimizer_state=optimizer_state, tensors=tensors, model_state=state)
