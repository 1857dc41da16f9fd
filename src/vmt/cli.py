"""The ``vmt`` command line: ``vmt bench``, and the model commands registered below."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("vmt")


def _bench(args: argparse.Namespace) -> int:
    from vmt import benchmarks

    if args.list or not args.name:
        for name, module in sorted(benchmarks.available().items()):
            sys.stdout.write(f"{name:22s} {getattr(module, 'SUMMARY', '')}\n")
        return 0
    module = benchmarks.get(args.name)
    docs_file = Path(args.docs)
    figure_dir = Path(args.figures) if args.figures else docs_file.parent / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    result = module.run(quick=args.quick, figure_dir=figure_dir)
    result.config.setdefault("quick", args.quick)
    for key, value in sorted(result.metrics.items()):
        sys.stdout.write(f"{key:40s} {value:.6g}\n")
    if args.json:
        benchmarks.write_json(result, Path(args.json))
    if not args.quick and not args.no_docs:
        if docs_file.parent.is_dir():
            benchmarks.update_docs(result, docs_file)
            logger.info("updated %s", docs_file)
        else:
            logger.warning("no %s here; pass --docs to say where the results page is", docs_file)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmt",
        description="Variational Markov Transformer: fit, evaluate and benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark",
        description="Run a named benchmark. Full runs update the results page (docs/benchmarks.md).",
    )
    bench.add_argument("name", nargs="?", help="benchmark name (see --list)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    bench.add_argument("--quick", action="store_true", help="small sizes, finishes in minutes")
    bench.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    bench.add_argument("--docs", default="docs/benchmarks.md", help="results page to update")
    bench.add_argument("--figures", metavar="DIR", help="where plots go (default: docs/figures)")
    bench.add_argument("--no-docs", action="store_true", help="do not update the results page")
    bench.set_defaults(func=_bench)

    for register in _COMMANDS:
        register(sub)
    return parser


# Model commands (fit, evaluate, demo, ...) add themselves here: each takes the subparsers
# object, adds its parser and sets ``func``.
_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
