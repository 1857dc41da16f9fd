"""Where vmt keeps files it can rebuild: converted model weights and feature caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of vmt's on-disk cache: ``$VMT_CACHE_DIR`` or ``~/.cache/vmt``."""
    root = os.environ.get("VMT_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "vmt"
    path.mkdir(parents=True, exist_ok=True)
    return path
