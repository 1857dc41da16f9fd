"""The import contract of docs/architecture.md: layers point one way.

Every module under ``src/vmt`` is read with :mod:`ast` (not imported), and every import of a
``vmt`` module, at the top, inside a function or under ``TYPE_CHECKING``, must go to a layer
its own layer may use. The checker is tested on synthetic modules first, so a broken checker
cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The core layers, lowest first, then the companions beside them.
CORE = ("base", "data", "encoders", "models", "inference", "top")
ALLOWED = {
    "base": {"base"},
    "data": {"base", "data"},
    "encoders": {"base", "data", "encoders"},
    "nn": {"base", "nn"},
    "mep": {"base", "mep"},
    "models": {"base", "data", "encoders", "nn", "models"},
    "inference": {"base", "data", "encoders", "nn", "models", "inference"},
    "memory": {"base", "data", "encoders", "nn", "models", "inference", "memory"},
    "top": set(CORE) | {"nn", "mep", "memory"},
}
# Single modules whose layer is not their folder's (or that have no folder).
MODULES = {
    "vmt": "top",
    "vmt.__main__": "top",
    "vmt.cli": "top",
    "vmt.data.cli": "top",  # the `vmt data` commands: command line, kept beside the data code
    "vmt.experiment": "top",
    "vmt.music_experiment": "top",
    "vmt.usage": "top",
    "vmt.checkpoint": "inference",
    "vmt.paths": "base",
    "vmt.hf_compat": "base",
    "vmt.testing": "base",
    "vmt.config_fields": "base",
    "vmt.atomic": "base",
}
PACKAGES = {
    "vmt.data": "data",
    "vmt.encoders": "encoders",
    "vmt.models": "models",
    "vmt.inference": "inference",
    "vmt.benchmarks": "top",
    "vmt.nn": "nn",
    "vmt.mep": "mep",
    "vmt.memory": "memory",
}


def layer_of(module: str) -> str:
    """The layer of a dotted ``vmt`` module name; ``KeyError`` for one the contract misses."""
    if module in MODULES:
        return MODULES[module]
    for package, layer in PACKAGES.items():
        if module == package or module.startswith(package + "."):
            return layer
    raise KeyError(f"{module} has no layer in tests/test_layers.py (add it, and to docs/architecture.md)")


def vmt_imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """``(imported vmt module, line)`` for every import in ``source`` of module ``module``.

    ``from vmt.x import name`` is an import of ``vmt.x.name`` when that is a module in
    ``known``, else of ``vmt.x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    unique = dict.fromkeys(found)  # `from vmt.x import a, b` is one import of vmt.x
    return [(name, line) for name, line in unique if name == "vmt" or name.startswith("vmt.")]


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every upward import among ``sources`` (``module -> (source, is_package)``)."""
    known = set(sources)
    out = []
    for module, (source, is_package) in sorted(sources.items()):
        mine = layer_of(module)
        for target, line in vmt_imports(source, module, is_package, known):
            theirs = layer_of(target)
            if theirs not in ALLOWED[mine]:
                out.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    return out


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted((SRC / "vmt").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        sources[module] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def test_no_module_imports_upward():
    sources = package_sources()
    assert len(sources) > 50
    assert violations(sources) == []


def test_every_module_has_a_layer():
    for module in package_sources():
        layer_of(module)


def test_every_layer_may_use_itself_and_the_base():
    for layer, allowed in ALLOWED.items():
        assert {layer, "base"} <= allowed


SYNTHETIC_OK = {
    "vmt.paths": ("import os\n", False),
    "vmt.data.corpus": ("from vmt.paths import cache_dir\n", False),
    "vmt.models": ("from vmt.models.batch import ChainBatch\n", True),
    "vmt.models.batch": ("from .config import VMTConfig\nimport vmt.data.corpus\n", False),
    "vmt.models.config": ("", False),
    "vmt.inference.train": ("from vmt.models import batch\nfrom vmt.nn.folded import F\n", False),
    "vmt.cli": ("from vmt import experiment\nfrom vmt.mep import solvers\n", False),
}


def test_the_checker_passes_downward_imports():
    assert violations(SYNTHETIC_OK) == []


@pytest.mark.parametrize(
    "module, source, expected",
    [
        # a top-level import of a higher layer
        ("vmt.data.memmap", "from vmt.models.batch import ChainBatch\n", "vmt.data.memmap:1 (data) imports vmt.models.batch (models)"),
        # an import inside a function counts too
        ("vmt.encoders.cache", "def f():\n    from vmt.inference.distributed import g\n",
         "vmt.encoders.cache:2 (encoders) imports vmt.inference.distributed (inference)"),
        # so does one under TYPE_CHECKING
        ("vmt.models.oracles", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vmt.inference.kalman\n",
         "vmt.models.oracles:3 (models) imports vmt.inference.kalman (inference)"),
        # a relative import is resolved against the package
        ("vmt.models.chain", "from ..inference import elbo\n", "vmt.models.chain:1 (models) imports vmt.inference (inference)"),
        # `from vmt import x` imports the module vmt.x when there is one
        ("vmt.inference.elbo", "from vmt import experiment\n", "vmt.inference.elbo:1 (inference) imports vmt.experiment (top)"),
        # the core may not import a companion that sits above it
        ("vmt.inference.train", "from vmt.memory import streaming_nll\n", "vmt.inference.train:1 (inference) imports vmt.memory (memory)"),
        # a companion may not reach into the core
        ("vmt.nn.folded", "from vmt.models.config import VMTConfig\n", "vmt.nn.folded:1 (nn) imports vmt.models.config (models)"),
    ],
)
def test_the_checker_catches_an_upward_import(module, source, expected):
    sources = {
        module: (source, False),
        "vmt.experiment": ("", False),
        "vmt.inference": ("", True),
    }
    assert violations(sources) == [expected]


def test_a_module_outside_the_contract_is_an_error():
    with pytest.raises(KeyError, match="vmt.newthing"):
        violations({"vmt.newthing": ("", False)})
