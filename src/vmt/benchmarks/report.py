"""Benchmark results: the JSON record and the section of ``docs/benchmarks.md``."""

from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BenchResult:
    """What one benchmark run measured.

    Attributes:
        benchmark: the benchmark's name.
        metrics: flat ``{name: number}``; names say what they measure, e.g. ``speedup_L256``.
        config: the settings of the run (quick or full, sizes, seeds).
        markdown: the body of the benchmark's section in ``docs/benchmarks.md`` (tables,
            links to figures relative to the docs folder).
        figures: image files written by the run.
    """

    benchmark: str
    metrics: dict[str, float]
    config: dict
    markdown: str = ""
    figures: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key, value in self.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")

    def to_json(self) -> dict:
        def clean(v: float):
            return v if math.isfinite(v) else None

        return {
            "benchmark": self.benchmark,
            "metrics": {k: clean(float(v)) for k, v in self.metrics.items()},
            "config": self.config,
        }


def write_json(result: BenchResult, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def update_docs(result: BenchResult, docs_file: Path) -> None:
    """Replace (or append) the benchmark's own section in ``docs_file``."""
    docs_file = Path(docs_file)
    text = docs_file.read_text() if docs_file.exists() else "# Benchmarks\n"
    begin, end = _markers(result.benchmark)
    machine = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    body = (
        f"{begin}\n## `{result.benchmark}`\n\n{result.markdown.strip()}\n\n"
        f"<sub>Produced by `vmt bench {result.benchmark}` on {machine}.</sub>\n{end}"
    )
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: body, text)
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    docs_file.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; floats get 4 significant digits."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% with ``z = 1.96``): unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or ``trials`` successes."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
