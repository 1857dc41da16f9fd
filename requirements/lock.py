"""Write, check and bound the pinned dependency set in ``requirements/lock.txt``.

The lock is a pip *constraints* file (``pip install -c requirements/lock.txt ...``): one
``name==version`` line per distribution of the tested environment, the project itself excluded.

    python requirements/lock.py freeze > requirements/lock.txt   # from a working environment
    python requirements/lock.py check requirements/lock.txt      # installed == locked, both ways
    python requirements/lock.py bounds pyro-ppl numpy            # ``name==lowest`` from pyproject

Local version labels (``2.13.0+cpu``) are dropped when writing and ignored when checking, so the
same lock serves the CPU and the default build of torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "variational-markov-transformer"
# Installer tooling that a virtual environment brings with it; never locked.
TOOLING = {"pip", "setuptools", "wheel"}
HEADER = """\
# Pinned versions of the full tested dependency set (a pip constraints file).
# `make venv` installs with `-c requirements/lock.txt`; refresh with `make lock`.
# Generated on CPython {python} by `python requirements/lock.py freeze`; do not edit by hand.
"""


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The version without its local label: ``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def installed() -> dict[str, tuple[str, str]]:
    """Canonical name -> (display name, version) of every installed distribution but the project."""
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name is None:
            continue
        key = canonical(name)
        if key == canonical(PROJECT) or key in TOOLING:
            continue
        found[key] = (name, dist.version)
    return found


def read_lock(path: Path) -> dict[str, str]:
    """Canonical name -> pinned version of every ``name==version`` line of a lock file."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def freeze() -> str:
    """The lock file text for the running environment."""
    rows = sorted(installed().values(), key=lambda row: canonical(row[0]))
    python = ".".join(str(part) for part in sys.version_info[:2])
    lines = [HEADER.format(python=python)]
    lines += [f"{name}=={public(version)}" for name, version in rows]
    return "\n".join(lines) + "\n"


def check(path: Path) -> list[str]:
    """Differences between the running environment and the lock; empty when they agree."""
    pins = read_lock(path)
    have = installed()
    problems = []
    for key, version in sorted(pins.items()):
        if key not in have:
            problems.append(f"{key}: locked {version}, not installed")
        elif public(have[key][1]) != public(version):
            problems.append(f"{key}: locked {version}, installed {have[key][1]}")
    for key, (_, version) in sorted(have.items()):
        if key not in pins:
            problems.append(f"{key}: installed {version}, not in the lock")
    return problems


def lower_bounds(pyproject: Path, names: list[str]) -> list[str]:
    """``name==lowest`` for each named dependency, from its ``>=`` bound in ``pyproject``."""
    import tomllib

    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    bounds: dict[str, str] = {}
    for requirement in declared:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)[^;]*?>=\s*([^,;\s]+)", requirement)
        if match is not None:
            bounds[canonical(match.group(1))] = match.group(2)
    missing = [name for name in names if canonical(name) not in bounds]
    if missing:
        raise ValueError(f"no '>=' lower bound in {pyproject} for {', '.join(missing)}")
    return [f"{name}=={bounds[canonical(name)]}" for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("freeze", help="write the lock of the running environment to stdout")
    check_parser = sub.add_parser("check", help="compare the running environment with a lock")
    check_parser.add_argument("lock", type=Path)
    bounds_parser = sub.add_parser("bounds", help="pins at the declared lower bounds")
    bounds_parser.add_argument("names", nargs="+")
    bounds_parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    if args.command == "freeze":
        sys.stdout.write(freeze())
        return 0
    if args.command == "check":
        problems = check(args.lock)
        for problem in problems:
            sys.stderr.write(f"lock mismatch: {problem}\n")
        if problems:
            sys.stderr.write(f"the environment differs from {args.lock}; recreate it or refresh the lock\n")
            return 1
        return 0
    try:
        sys.stdout.write("\n".join(lower_bounds(args.pyproject, args.names)) + "\n")
    except ValueError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
