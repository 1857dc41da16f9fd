"""The lock (requirements/lock.txt) agrees with pyproject, and its tool finds every difference."""

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # the lock is made on CPython 3.11+

ROOT = Path(__file__).parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
spec = importlib.util.spec_from_file_location("lock_tool", ROOT / "requirements" / "lock.py")
lock_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_tool)


def declared(extra_dev: bool = True) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = project["dependencies"] + (project["optional-dependencies"]["dev"] if extra_dev else [])
    return [Requirement(r) for r in found]


def test_the_lock_pins_every_declared_dependency_inside_its_range():
    pins = lock_tool.read_lock(LOCK)
    for requirement in declared():
        key = lock_tool.canonical(requirement.name)
        assert key in pins, f"{requirement.name} is declared but not locked"
        assert requirement.specifier.contains(pins[key], prereleases=True), (
            f"locked {requirement.name}=={pins[key]} is outside {requirement.specifier}"
        )


def test_the_lock_holds_the_pins_make_installs():
    pins = lock_tool.read_lock(LOCK)
    makefile = (ROOT / "Makefile").read_text()
    for variable in ("TORCH", "SMOLLM"):
        name, version = re.search(rf"^{variable} := (\S+)==(\S+)$", makefile, re.M).groups()
        assert pins[lock_tool.canonical(name)] == version
    assert all("+" not in version for version in pins.values())  # no local labels


def test_freeze_then_check_agree_and_a_changed_pin_is_reported(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(lock_tool.freeze())
    assert lock_tool.check(lock) == []
    pins = lock_tool.read_lock(lock)
    assert "torch" in pins and lock_tool.canonical(lock_tool.PROJECT) not in pins
    changed = lock.read_text().replace(f"\nnumpy=={pins['numpy']}\n", "\nnumpy==0.0.1\n")
    changed += "not-a-real-distribution==1.0\n"
    lock.write_text(changed.replace(f"\npyro-ppl=={pins['pyro-ppl']}\n", "\n"))
    assert lock_tool.check(lock) == [
        "not-a-real-distribution: locked 1.0, not installed",
        f"numpy: locked 0.0.1, installed {pins['numpy']}",
        f"pyro-ppl: installed {pins['pyro-ppl']}, not in the lock",
    ]


def test_a_line_that_is_not_a_pin_is_rejected(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\nnumpy>=2\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: expected 'name==version', got 'numpy>=2'"):
        lock_tool.read_lock(lock)


def test_bounds_are_the_declared_lower_bounds(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch>=2.3,<2.14", "Pyro_PPL >= 1.9, <1.10", "tqdm"]\n')
    assert lock_tool.lower_bounds(pyproject, ["pyro-ppl", "torch"]) == ["pyro-ppl==1.9", "torch==2.3"]
    with pytest.raises(ValueError, match="no '>=' lower bound .* for tqdm"):
        lock_tool.lower_bounds(pyproject, ["tqdm"])
