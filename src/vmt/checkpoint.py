"""Checkpoints: safetensors for tensors, JSON for everything else — never pickle.

A checkpoint is a folder::

    checkpoint.json        format version, VMTConfig, reader spec, training config and state
    model.safetensors      the VMT's state dict
    optimizer.safetensors  the optimiser's tensors (its scalars are in the JSON)
    state.safetensors      carried latent states (windows regime; earlier versions also
                           saved random-number states, which resume ignores)

Crash safety. ``PATH`` is a symbolic link to a complete, versioned folder beside it::

    PATH -> PATH.steps/000007           the current checkpoint
    PATH.steps/000006/                  the one before it (kept as a fallback)

A save writes the new version into a temporary folder inside ``PATH.steps``, renames it to the
next version number (a version folder is therefore always complete), then points ``PATH`` at
it by renaming a new link over the old one (atomic), and only then removes versions older than
the previous one. A kill at any instant leaves ``PATH`` naming a complete checkpoint, or no
``PATH`` but complete versions: :func:`find_checkpoint` (used by every loader) then falls back
to the newest complete version, and also recovers the leftovers of the earlier one-folder
layout (``.PATH.old`` and complete temporary folders). Nothing non-finite is ever written.

:class:`RunLock` keeps two processes from training into the same folder at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vmt.atomic import fsync_dir
from vmt.models.config import VMTConfig

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

FORMAT_VERSION = 1
KEEP_VERSIONS = 2  # the current checkpoint and the one before it

logger = logging.getLogger(__name__)


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


def versions_dir(path: str | Path) -> Path:
    """The folder holding the versions of checkpoint ``path`` (``PATH.steps``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.steps")


def _versions(path: Path) -> list[Path]:
    """Complete version folders of ``path``, oldest first."""
    folder = versions_dir(path)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.isdigit() and (p / "checkpoint.json").is_file()]
    return sorted(found, key=lambda p: int(p.name))


def _legacy_candidates(path: Path) -> list[Path]:
    """Complete folders left by the one-folder layout's interrupted saves."""
    out = []
    for p in path.parent.glob(f".{path.name}.*"):
        if p.is_dir() and not p.is_symlink() and (p / "checkpoint.json").is_file():
            out.append(p)
    return out


def _stored_step(folder: Path) -> int:
    try:
        meta = json.loads((folder / "checkpoint.json").read_text())
        return int(meta.get("step", -1)) if isinstance(meta, dict) else -1
    except (OSError, ValueError, TypeError):
        return -1


def check_checkpoint_path(path: str | Path) -> Path:
    """Refuse a ``checkpoint_dir`` that is an existing file or a folder holding something else.

    Nothing is moved or deleted: the check runs before any training or writing.
    """
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return path
    if not path.is_dir():
        raise ValueError(f"checkpoint folder {path} is an existing file; give a folder path")
    if not (path / "checkpoint.json").is_file() and any(path.iterdir()):
        raise ValueError(f"checkpoint folder {path} exists and holds files that are not a vmt checkpoint")
    return path


def find_checkpoint(path: str | Path) -> Path | None:
    """The folder to read checkpoint ``path`` from, or ``None`` if there is none.

    ``path`` itself when it links to the newest complete version (or is a complete
    checkpoint folder of the one-folder layout); otherwise the newest complete version left by
    an interrupted save (logged as a warning). Never writes.
    """
    path = Path(path)
    versions = _versions(path)
    if (path / "checkpoint.json").is_file():
        newest = versions[-1] if versions else None
        if newest is None or not path.is_symlink() or path.resolve() == newest.resolve():
            return path
        # the save was killed between completing a version and pointing the link at it
        logger.warning("checkpoint %s points at an older version; using the newest complete one, %s", path, newest)
        return newest
    if path.exists() and not path.is_symlink() and not path.is_dir():
        return None
    legacy = _legacy_candidates(path)
    if not versions and not legacy:
        return None
    candidates = [(_stored_step(v), 1, int(v.name), v) for v in versions]
    candidates += [(_stored_step(v), 0, 0, v) for v in legacy]
    best = max(candidates, key=lambda c: c[:3])[3]
    logger.warning("checkpoint %s is missing or incomplete (an interrupted save); using %s", path, best)
    return best


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(
    path: str | Path,
    vmt,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    meta: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint crash-safely (see the module docstring) and return ``path``.

    Raises ValueError, writing nothing, if ``path`` is an existing file or a folder that is
    not a checkpoint, or if any model or optimiser tensor is not finite.
    """
    path = check_checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in vmt.state_dict().items()}
    bad = _non_finite(state)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer) if optimizer is not None else ({}, None)
    bad += [f"optimizer {k}" for k in _non_finite(opt_tensors)]
    if bad:
        raise ValueError(f"refusing to save non-finite tensors to {path}: {', '.join(bad[:5])}")
    record = {
        "format_version": FORMAT_VERSION,
        "vmt_config": vmt.config.to_dict(),
        "reader": getattr(vmt, "reader_spec", None),
        **(meta or {}),
    }
    if opt_meta is not None:
        record["optimizer"] = opt_meta
    text = json.dumps(record, indent=1, default=_json_default)
    folder = versions_dir(path)
    folder.mkdir(exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        # a checkpoint of the one-folder layout (or an empty folder) becomes a version first
        if (path / "checkpoint.json").is_file():
            os.replace(path, folder / f"{_next_version(folder):06d}")
        else:
            path.rmdir()
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        save_file(state, str(tmp / "model.safetensors"))
        if optimizer is not None:
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in (tensors or {}).items()}, str(tmp / "state.safetensors"))
        with open(tmp / "checkpoint.json", "w") as handle:  # written last: marks the folder complete
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
            if (tmp / name).exists():
                with open(tmp / name, "rb") as handle:
                    os.fsync(handle.fileno())
        version = folder / f"{_next_version(folder):06d}"
        os.rename(tmp, version)
        fsync_dir(folder)
        link = path.with_name(f".{path.name}.link-{os.getpid()}")
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.join(folder.name, version.name), link)
        os.replace(link, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(path, folder, version)
    return path


def _next_version(folder: Path) -> int:
    numbers = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    return max(numbers, default=0) + 1


def _prune(path: Path, folder: Path, current: Path) -> None:
    """Remove versions older than the last ``KEEP_VERSIONS`` and leftovers of earlier saves."""
    keep = {p.name for p in _versions(path)[-KEEP_VERSIONS:]} | {current.name}
    for p in folder.iterdir():
        stale = (p.name.isdigit() and p.name not in keep) or p.name.startswith((".writing-", ".trash-"))
        if stale and p.is_dir():
            trash = p if p.name.startswith(".trash-") else folder / f".trash-{p.name}"
            if trash != p:
                os.replace(p, trash)  # a version disappears whole, never half-deleted
            shutil.rmtree(trash, ignore_errors=True)
    for p in _legacy_candidates(path) + list(path.parent.glob(f".{path.name}.old")):
        shutil.rmtree(p, ignore_errors=True)


class RunLock:
    """An exclusive lock on a run or checkpoint folder, held while one process trains into it.

    The lock file names the holder's pid; the operating system releases the lock when the
    holder exits, even on SIGKILL, so a lock is never stale. A second holder gets a one-line
    ValueError naming the first.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ValueError(
                f"{self.path.parent} is in use by another vmt run (pid {holder}); "
                "wait for it to finish or choose another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the lock
            self._handle = None


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def read_meta(path: str | Path) -> dict:
    """The JSON part of a checkpoint, with clear errors for missing or corrupt files."""
    path = Path(path)
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a vmt checkpoint (no checkpoint.json)")
    meta_file = found / "checkpoint.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt checkpoint {path}: checkpoint.json is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint {path}: checkpoint.json holds a {type(meta).__name__}, not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {meta.get('format_version')!r}; "
            f"this vmt reads version {FORMAT_VERSION}"
        )
    return meta


def differences(stored, now, prefix: str = "") -> list[str]:
    """Where two JSON-like values differ, as ``key: stored -> now`` lines (dotted keys)."""
    if isinstance(stored, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(stored) | set(now), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{name}: (absent) -> {_short(now[key])}")
            elif key not in now:
                out.append(f"{name}: {_short(stored[key])} -> (absent)")
            else:
                out += differences(stored[key], now[key], name)
        return out
    if isinstance(stored, list | tuple) and isinstance(now, list | tuple) and len(stored) == len(now):
        for i, (a, b) in enumerate(zip(stored, now, strict=True)):
            if a != b:
                return [f"{prefix}[{i}]: {_short(a)} -> {_short(b)}"]
        return []
    if isinstance(stored, list | tuple) and isinstance(now, list | tuple):
        return [f"{prefix}: {len(stored)} entries -> {len(now)} entries"]
    return [] if stored == now else [f"{prefix}: {_short(stored)} -> {_short(now)}"]


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def read_meta_for(path: str | Path, config: VMTConfig) -> dict:
    """:func:`read_meta`, refusing a checkpoint written for another model config (resume);
    the error names every differing field (checkpoint value -> this run's value). A field the
    checkpoint does not name (it was written before the field existed) counts as its default."""
    meta = read_meta(path)
    stored = meta.get("vmt_config")
    if isinstance(stored, dict) and set(stored) <= set(config.to_dict()):
        stored = VMTConfig.from_dict(stored).to_dict()
    diff = differences(stored, config.to_dict(), "vmt_config")
    if diff:
        raise ValueError(
            f"checkpoint {path} was written for a different model config ({'; '.join(diff[:4])}); "
            "use another checkpoint folder or the same config"
        )
    return meta


# Resume policy over the run's JSON (see check_resume): fields that may change freely, fields
# that may change only when the caller accepts a changed schedule, and (everything else) fields
# that must match, since they change the data, the vocabulary or what a step means.
FREE_CHANGES = frozenset({
    "train_config.steps", "train_config.max_cpu_seconds", "train_config.checkpoint_every",
    "train_config.log_every",
    "schedule.eval_particles", "schedule.max_test_tokens", "schedule.reverse_steps",
    "preset.description",
})
SCHEDULE_CHANGES = frozenset({
    "train_config.learning_rate", "train_config.clip_norm", "train_config.annealing_start",
    "train_config.annealing_steps", "train_config.aux_weight",
    "train_config.lr_decay_steps", "train_config.lr_final_fraction",
})


def check_resume(path: str | Path, stored: dict, now: dict, accept_schedule: bool = False) -> list[str]:
    """Refuse to resume checkpoint ``path`` (its JSON ``stored``) into a run described by
    ``now`` (the same keys: ``train_config``, and e.g. ``corpus``, ``vocabulary``, ``preset``,
    ``schedule``) when they differ in anything but :data:`FREE_CHANGES`; the differences in
    :data:`SCHEDULE_CHANGES` are allowed with ``accept_schedule`` and returned.

    Raises a one-line ValueError naming the first differences.
    """
    found = []
    for key in sorted(now):
        if key in stored:
            found += differences(stored[key], now[key], key)
    fatal, schedule = [], []
    for line in found:
        field_name = line.split(":", 1)[0].split("[", 1)[0]
        if field_name in FREE_CHANGES:
            continue
        (schedule if field_name in SCHEDULE_CHANGES else fatal).append(line)
    if fatal:
        data = [d for d in fatal if d.startswith(("corpus", "vocabulary"))]
        what = "the training data or vocabulary changed" if data else "the run's settings changed"
        raise ValueError(
            f"cannot resume {path}: {what} ({'; '.join(fatal[:3])}); "
            "pass --restart (resume=False) to start again, or use another --out"
        )
    if schedule and not accept_schedule:
        raise ValueError(
            f"cannot resume {path}: the training schedule changed ({'; '.join(schedule[:3])}); "
            "pass --accept-schedule (accept_schedule=True) to continue with the new values, or --restart"
        )
    return schedule


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint file {file}: {err}") from err


def load_state_into(vmt: VariationalMarkovTransformer, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
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
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a vmt checkpoint (no checkpoint.json)")
    path = found.resolve()  # one version throughout, even if a save re-points the link meanwhile
    meta = read_meta(path)
    if not isinstance(meta.get("vmt_config"), dict):
        raise ValueError(f"corrupt checkpoint {path}: checkpoint.json has no vmt_config object")
    config = VMTConfig.from_dict(meta["vmt_config"])
    state = _load_tensors(path / "model.safetensors")
    vmt = None
    if build_model:
        vmt = VariationalMarkovTransformer(config, reader=reader, reader_spec=None if reader else meta.get("reader"))
        load_state_into(vmt, state, f"checkpoint {path}")
    optimizer_state = None
    if "optimizer" in meta:
        try:
            optimizer_state = _unflatten_optimizer(_load_tensors(path / "optimizer.safetensors"), meta["optimizer"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"corrupt checkpoint {path}: unreadable optimizer state ({err})") from err
    tensors = _load_tensors(path / "state.safetensors") if (path / "state.safetensors").exists() else {}
    return Checkpoint(vmt=vmt, meta=meta, optimizer_state=optimizer_state, tensors=tensors, model_state=state)
