"""Benchmarks run by ``vmt bench NAME [--quick] [--json PATH]``.

Each benchmark is a module in this package that defines

* ``NAME``: the command-line name, e.g. ``"svi-speed"``;
* ``SUMMARY``: one line for ``vmt bench --list``;
* ``run(quick: bool, figure_dir: pathlib.Path) -> BenchResult``.

Modules are discovered automatically; ``quick`` runs finish in minutes. Timings are always
reported as ratios against a baseline measured in the same run, never as a lone absolute time.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from vmt.benchmarks.report import BenchResult, update_docs, write_json

__all__ = ["BenchResult", "available", "get", "update_docs", "write_json"]

_SKIP = {"report", "timing"}


def available() -> dict[str, ModuleType]:
    """All benchmark modules, keyed by their ``NAME``."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _SKIP:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "NAME", None)
        if name is None:
            continue
        if name in found:
            raise RuntimeError(f"two benchmark modules are both called {name!r}")
        found[name] = module
    return found


def get(name: str) -> ModuleType:
    modules = available()
    if name not in modules:
        known = ", ".join(sorted(modules)) or "none"
        raise KeyError(f"no benchmark called {name!r}; available: {known}")
    return modules[name]
