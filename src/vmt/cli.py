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
    user_text = bool(getattr(args, "text", None))
    if args.figures:
        figure_dir = Path(args.figures)
    elif args.quick or args.no_docs or user_text:
        figure_dir = Path("runs") / "bench" / args.name  # quick plots never replace the docs' ones
    else:
        figure_dir = docs_file.parent / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if args.data is not None:
        import inspect

        if "data" not in inspect.signature(module.run).parameters:
            raise ValueError(f"benchmark {args.name!r} takes no --data")
        kwargs["data"] = args.data
    if user_text:
        import inspect

        if "text" not in inspect.signature(module.run).parameters:
            raise ValueError(f"benchmark {args.name!r} takes no --text")
        kwargs["text"] = args.text
    result = module.run(quick=args.quick, figure_dir=figure_dir, **kwargs)
    result.config.setdefault("quick", args.quick)
    for key, value in sorted(result.metrics.items()):
        sys.stdout.write(f"{key:40s} {value:.6g}\n")
    if args.json:
        benchmarks.write_json(result, Path(args.json))
    if not args.quick and not args.no_docs and not user_text:  # the page is about the default corpus
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
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
    bench.add_argument("--data", metavar="PATH", help="a data file for benchmarks that take one (chorales: the JSB pickle)")
    bench.add_argument("--text", nargs="+", metavar="FILE",
                       help="text files (one document each) for benchmarks that take them (text-lm); "
                       "the results page is not updated")
    bench.set_defaults(func=_bench)

    for register in _COMMANDS:
        register(sub)
    return parser


def _report(result) -> None:
    test = result.test
    sys.stdout.write(
        f"held-out: {test.tokens} tokens in {test.documents} documents\n"
        f"  negative ELBO        {test.neg_elbo_per_token:.4f} nats/token\n"
        f"  IWAE-{test.particles:<3d} bound     {test.iwae_per_token:.4f} nats/token "
        f"(perplexity <= {test.perplexity_bound:.2f})\n"
        f"{test.summary()}\n"
        f"checkpoint: {result.checkpoint}\ntraining curve: {result.curve}\n"
    )


def _run(args: argparse.Namespace, model: str, schedule: str, out: str):
    from vmt import experiment

    experiment.set_threads()
    preset = experiment.ModelPreset.from_dict(
        experiment.load_json(experiment.resolve_config(model, "models"))
    )
    sched = experiment.Schedule.from_dict(
        experiment.load_json(experiment.resolve_config(schedule, "inference"))
    )
    if getattr(args, "steps", None) is not None:
        sched = experiment.Schedule(**{**sched.__dict__, "train": type(sched.train)(
            **{**sched.train.__dict__, "steps": args.steps})})
    texts, name = None, "pydoc"
    if getattr(args, "text", None):
        from vmt.data.corpus import read_text_files

        texts, name = read_text_files(args.text), "user-text"
    result = experiment.run_text(preset, sched, out, texts, name, resume=not getattr(args, "restart", False),
                                 accept_schedule=getattr(args, "accept_schedule", False))
    _report(result)
    return result


def _fit(args: argparse.Namespace) -> int:
    _run(args, args.model, args.schedule, args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vmt import experiment

    result = _run(args, "text-smollm2", "demo", args.out)
    steps = result.text_run.schedule.reverse_steps
    if steps > 0 and result.model.config.reverse:
        experiment.fit_reverse(result, args.out, steps)
    usage = experiment.demo_usage(result, args.out)
    sys.stdout.write(
        f"read a held-out document of {usage.tokens_read} tokens in {usage.windows} windows "
        f"(state carried): {usage.neg_elbo_per_token:.4f} nats/token (single-sample -ELBO, "
        f"compact vocabulary)\ncontinuation: {usage.continuation!r}\n"
        + (f"prequel (written in reverse, shown in reading order): {usage.prequel!r}\n" if usage.prequel is not None else "")
        + f"posterior state trajectory: {usage.trajectory_plot}\n"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from vmt import experiment

    experiment.set_threads()
    texts = None
    if getattr(args, "text", None):
        from vmt.data.corpus import read_text_files

        texts = read_text_files(args.text)
    res = experiment.evaluate_checkpoint(args.run, particles=args.particles, texts=texts)
    sys.stdout.write(
        f"negative ELBO {res.neg_elbo_per_token:.4f} nats/token; IWAE-{res.particles} "
        f"{res.iwae_per_token:.4f} nats/token (perplexity <= {res.perplexity_bound:.2f}) "
        f"over {res.tokens} tokens\n{res.summary()}\n"
    )
    return 0


def _add_model_commands(sub) -> None:
    fit = sub.add_parser(
        "fit",
        help="fit a VMT on text",
        description="Fit a VMT: a model preset (models/NAME.json) with a schedule "
        "(inference/NAME.json) on the embedded pydoc corpus or your text files. Resumes from "
        "OUT/checkpoint if present; Ctrl-C saves a checkpoint.",
    )
    fit.add_argument("--model", default="text-smollm2", help="preset name or JSON path")
    fit.add_argument("--schedule", default="demo", help="schedule name or JSON path")
    fit.add_argument("--text", nargs="+", metavar="FILE", help="train on these text files")
    fit.add_argument("--out", default="runs/fit", help="run folder (checkpoint, curve, results)")
    fit.add_argument("--steps", type=int, help="override the number of SVI steps")
    fit.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    fit.add_argument("--accept-schedule", action="store_true",
                     help="resume although the learning rate, clipping or annealing changed (the new values apply)")
    fit.set_defaults(func=_fit)

    ev = sub.add_parser(
        "evaluate",
        help="held-out bounds of a fitted run",
        description="Negative ELBO and IWAE-k per token on the run's held-out split.",
    )
    ev.add_argument("run", help="run folder written by `vmt fit` (or its checkpoint folder)")
    ev.add_argument("--particles", type=int, help="k of the IWAE bound")
    ev.add_argument("--text", nargs="+", metavar="FILE",
                    help="the text files the run was fitted on (checked against its stored fingerprint)")
    ev.set_defaults(func=_evaluate)

    demo = sub.add_parser(
        "demo",
        help="fit and evaluate on the embedded defaults (a few minutes)",
        description="Fit the text-smollm2 preset with the demo schedule on pydoc_data.topics, "
        "print held-out bounds, save a checkpoint and a PNG of the training curve.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--steps", type=int, help="override the number of SVI steps")
    demo.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    demo.set_defaults(func=_demo)


# Model commands add themselves here: each takes the subparsers object, adds its parser and
# sets ``func``.
def _add_data_commands(sub) -> None:
    from vmt.data.cli import add_data_commands

    add_data_commands(sub)


_COMMANDS: list = [_add_model_commands, _add_data_commands]


# Errors that mean the input (arguments, files, configurations) is wrong: exit code 2.
_INPUT_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError, EOFError)


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, KeyError):
        text = f"missing entry {text!r}"
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text} ({err.filename})"
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _exit_code(err: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an error that reached the command line."""
    import pickle

    from vmt.experiment import RunInterrupted, TrainingStopped

    if isinstance(err, RunInterrupted):
        return (143 if err.result.signal == "SIGTERM" else 130), _one_line(err)
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, TrainingStopped):
        return 1, _one_line(err)
    if isinstance(err, _INPUT_ERRORS + (pickle.UnpicklingError,)):
        return 2, _one_line(err)
    return 1, (f"internal error ({type(err).__name__}: {_one_line(err)}); "
               "run again with --debug for the traceback")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        code, message = _exit_code(err)
        logger.error("%s", message)
        return code
