"""The ``vmt`` command line: ``vmt bench``, and the model commands registered below."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("vmt")

# What `vmt demo` fits: a model preset and a schedule shipped with the package.
DEMO_PRESET = "text-token"
DEMO_SCHEDULE = "token-demo"


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
        description="Variational Markov Transformer: fit, evaluate, use and benchmark.",
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
        f"  IWAE-{test.particles:<3d} bound     {test.neg_iwae_per_token:.4f} nats/token "
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
    steps = result.text_run.schedule.reverse_steps
    if steps > 0 and result.model.config.reverse:
        experiment.fit_reverse(result, out, steps)
        sys.stdout.write(f"reverse parts: {Path(out) / 'checkpoint-with-reverse'}\n")
    return result


def _fit(args: argparse.Namespace) -> int:
    from vmt import experiment, music_experiment

    preset = experiment.load_json(experiment.resolve_config(args.model, "models"))
    if music_experiment.is_music_preset(preset):
        return _fit_music(args, preset)
    if getattr(args, "data", None):
        raise ValueError("--data is for piano-roll presets (e.g. --model jsb); text runs take --text")
    _run(args, args.model, args.schedule, args.out)
    return 0


def _music_splits(data: str | None):
    """The piano-roll splits of ``--data``: a JSB-format pickle, or ``music21`` (the chorales
    that ship with music21); without it ``$VMT_JSB_PICKLE``."""
    import os

    from vmt.data.music import load_jsb_chorales, music21_chorales

    source = data or os.environ.get("VMT_JSB_PICKLE")
    if not source:
        raise ValueError("a piano-roll preset needs --data PATH (a JSB-format pickle), --data music21, "
                         "or $VMT_JSB_PICKLE")
    if source == "music21":
        return music21_chorales(), "music21 chorales"
    return load_jsb_chorales(source), f"JSB pickle {Path(source).name}"


def _fit_music(args: argparse.Namespace, preset_data: dict) -> int:
    from vmt import experiment, music_experiment

    if getattr(args, "text", None):
        raise ValueError("a piano-roll preset takes --data, not --text")
    preset = music_experiment.MusicPreset.from_dict(preset_data)
    schedule = music_experiment.MusicSchedule.from_dict(
        experiment.load_json(experiment.resolve_config(args.schedule, "inference")))
    if args.steps is not None:
        _positive(args.steps, "--steps")
        schedule = music_experiment.MusicSchedule(**{**schedule.__dict__, "train": type(schedule.train)(
            **{**schedule.train.__dict__, "steps": args.steps})})
    splits, name = _music_splits(args.data)
    res = music_experiment.run_music(preset, schedule, splits, args.out, resume=not args.restart,
                                     accept_schedule=args.accept_schedule, data_name=name)
    lines = [f"{res.steps} SVI steps, {res.cpu_seconds:.0f} CPU s of training ({res.stopped}); "
             f"best validation at step {res.best_step}"]
    if res.stopped == "interrupted":
        lines.append(f"interrupted; progress saved in {args.out}; run the same command again to resume")
    for label, ev in (("validation", res.valid), ("test", res.test), ("test", res.iwae)):
        if ev is not None:
            lines.append(f"{label:10s} -ELBO {ev.neg_elbo_per_token:.4f}  IWAE-{ev.particles} "
                         f"{ev.iwae_per_token:.4f} nats/step over {ev.tokens} steps")
    lines.append(f"run folder: {args.out}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if res.stopped in ("steps", "cpu budget", "patience", "interrupted") else 1


def _demo(args: argparse.Namespace) -> int:
    from vmt import experiment

    result = _run(args, DEMO_PRESET, DEMO_SCHEDULE, args.out)
    base = experiment.split_baselines(result.text_run)
    test = result.test
    lines = [f"on the same held-out split ({base.tokens} tokens), nats/token over the LM's full vocabulary:",
             f"  unigram (add-1/2)           {base.unigram:.4f}",
             f"  Kneser-Ney bigram           {base.bigram:.4f}"]
    if base.lm_document is not None:
        lines.append(f"  SmolLM2, whole document     {base.lm_document:.4f}")
    lines.append(f"  this VMT, IWAE-{test.particles} bound      {test.neg_iwae_per_token:.4f}"
                 f"  ({'below' if test.neg_iwae_per_token < base.bigram else 'not below'} the bigram)")
    usage = experiment.demo_usage(result, args.out)
    lines += [
        f"read a held-out document of {usage.tokens_read} tokens in {usage.windows} windows "
        f"(state carried): {usage.neg_elbo_per_token:.4f} nats/token (single-sample -ELBO, "
        f"compact vocabulary)",
        f"continuation: {usage.continuation!r}",
    ]
    if usage.continuation_nll is not None:
        lines.append(f"  mean NLL under SmolLM2 given the read text: VMT continuation "
                     f"{usage.continuation_nll:.3f}, bigram sample of the same length "
                     f"{usage.bigram_sample_nll:.3f} nats/token")
    if usage.prequel is not None:
        lines.append(f"prequel (written in reverse, shown in reading order): {usage.prequel!r}")
    lines.append(f"posterior state trajectory: {usage.trajectory_plot}")
    sys.stdout.write("\n".join(lines) + "\n")
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
        f"{res.neg_iwae_per_token:.4f} nats/token (perplexity <= {res.perplexity_bound:.2f}) "
        f"over {res.tokens} tokens\n{res.summary()}\n"
    )
    return 0


def _add_model_commands(sub) -> None:
    fit = sub.add_parser(
        "fit",
        help="fit a VMT on text or piano rolls",
        description="Fit a VMT: a model preset (models/NAME.json) with a schedule "
        "(inference/NAME.json) on the embedded pydoc corpus or your text files, or, with a "
        "piano-roll preset (e.g. --model jsb --schedule jsb-hour), on --data. Resumes from "
        "OUT/checkpoint if present; Ctrl-C saves a checkpoint.",
    )
    fit.add_argument("--model", default=DEMO_PRESET, help="preset name or JSON path")
    fit.add_argument("--schedule", default=DEMO_SCHEDULE, help="schedule name or JSON path")
    fit.add_argument("--text", nargs="+", metavar="FILE", help="train on these text files")
    fit.add_argument("--data", metavar="PATH",
                     help="piano-roll presets (e.g. --model jsb): a JSB-format pickle, or 'music21'")
    fit.add_argument("--out", default="runs/fit", help="run folder (checkpoint, curve, results)")
    fit.add_argument("--steps", type=int, help="override the number of SVI steps (a learning-rate "
                     "decay keeps its own length, the schedule's lr_decay_steps)")
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
        description=f"Fit the {DEMO_PRESET} preset with the {DEMO_SCHEDULE} schedule on pydoc_data.topics, "
        "print held-out bounds beside unigram, bigram and SmolLM2 on the same split, write a "
        "continuation and a prequel, save a checkpoint and PNGs of the training curve and states.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--steps", type=int, help="override the number of SVI steps")
    demo.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    demo.set_defaults(func=_demo)


def _text_file(path: str, what: str) -> str:
    """The UTF-8 text of a file given on the command line, with one-line errors."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{what} {file} does not exist")
    if not file.is_file():
        raise ValueError(f"{what} {file} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {file} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise ValueError(f"{what} {file} is empty")
    return text


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")


def _sampling(args: argparse.Namespace):
    from vmt.inference.generation import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _sample(args: argparse.Namespace) -> int:
    from vmt import usage

    _positive(args.tokens, "--tokens")
    _positive(args.samples, "--samples")
    sampling = _sampling(args)
    if args.unconditional and (args.prompt is not None or args.prompt_file is not None):
        raise ValueError("--unconditional writes without a prompt: drop --prompt/--prompt-file")
    prompt = _text_file(args.prompt_file, "prompt file") if args.prompt_file is not None else args.prompt
    if prompt is None and not args.unconditional:
        raise ValueError("give --prompt TEXT, --prompt-file FILE or --unconditional")
    if prompt is not None and not prompt.strip():
        raise ValueError("the prompt is empty")
    run = usage.load_run(args.run, reverse=args.reverse)
    texts = usage.sample_text(run, prompt, num_tokens=args.tokens, reverse=args.reverse, sampling=sampling,
                              samples=args.samples, seed=args.seed, progress=True)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            sys.stdout.write(f"--- sample {i}\n")
        sys.stdout.write(text + "\n")
    return 0


def _read(args: argparse.Namespace) -> int:
    from vmt import usage

    for value, flag in ((args.window, "--window"), (args.chains, "--chains"), (args.draws, "--draws"),
                        (args.max_tokens, "--max-tokens")):
        _positive(value, flag)
    text = _text_file(args.file, "file")
    usage.netcdf_engine()  # fail before the work if the file cannot be written
    run = usage.load_run(args.run)
    report = usage.read_text(run, text, out=args.out, plot=args.plot, window=args.window, chains=args.chains,
                             draws=args.draws, max_tokens=args.max_tokens, seed=args.seed, progress=True)

    def numbers(values, shown: int = 8, fmt: str = "+.3f") -> str:
        text = " ".join(f"{v:{fmt}}" for v in values[:shown])
        return text + (f" ... ({len(values)} states)" if len(values) > shown else "")

    sys.stdout.write(
        f"read {args.file}: {report.tokens_read} tokens in {report.windows} windows (state carried): "
        f"{report.neg_elbo_per_token:.4f} nats/token (single-sample -ELBO, compact vocabulary)\n"
        f"posterior: {report.chains} chains x {report.draws} draws of {report.positions} positions -> "
        f"{report.netcdf}\n"
        f"  posterior sd per state (mean over positions): {numbers(report.state_sd, fmt='.3f')}\n"
        f"  last exported position: mean {numbers(report.last_mean)}, sd {numbers(report.last_sd, fmt='.3f')}\n"
        f"  max R-hat {report.r_hat_max:.3f}, min bulk ESS {report.ess_bulk_min:.0f} "
        f"(independent guide draws: this checks the plumbing)\n"
        f"trajectory: {report.plot}\n"
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    from vmt import usage

    _positive(args.tokens, "--tokens")
    _positive(args.window, "--window")
    sampling = _sampling(args)
    if args.load_state is not None and not Path(args.load_state).is_file():
        raise FileNotFoundError(f"no state file {args.load_state}")
    run = usage.load_run(args.run)
    session = usage.ChatSession(run, reply_tokens=args.tokens, sampling=sampling, window=args.window)
    if args.load_state is not None:
        session.load_state(args.load_state)
        logger.info("continuing from %s (%d turns)", args.load_state, session.turns)
    import torch

    torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    try:
        usage.chat(session, sys.stdin, sys.stdout, prompt="> " if interactive else "")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    finally:
        if args.save_state is not None and session.conversation.state is not None:
            path = session.save_state(args.save_state)
            logger.info("saved the state after %d turns to %s", session.turns, path)
    return 0


def _add_sampling_flags(parser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="divide the emission logits by T (> 0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def _add_use_commands(sub) -> None:
    run_help = "run folder written by `vmt fit` or `vmt demo` (or a checkpoint folder)"
    sample = sub.add_parser(
        "sample",
        help="write with a fitted run: a continuation, a prequel, or unconditional text",
        description="Read a prompt (state carried across windows) and write what follows it; with "
        "--reverse write what comes before it (needs the reverse parts: "
        "RUN/checkpoint-with-reverse); with --unconditional start from the prior.",
    )
    sample.add_argument("run", help=run_help)
    prompt = sample.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    sample.add_argument("--tokens", type=int, default=40, metavar="N", help="tokens to write (default 40)")
    sample.add_argument("--reverse", action="store_true", help="write a prequel (or, unconditional, an ending)")
    sample.add_argument("--unconditional", action="store_true", help="no prompt: start from the prior")
    sample.add_argument("--samples", type=int, default=1, help="independent texts to write")
    _add_sampling_flags(sample)
    sample.set_defaults(func=_sample)

    rd = sub.add_parser(
        "read",
        help="read a text file into posterior states (ArviZ DataTree in netCDF)",
        description="Read FILE with the state carried across windows (prints its -ELBO per token), "
        "draw chains x draws posterior state paths, export them as an ArviZ DataTree to netCDF "
        "(groups posterior, log_likelihood, posterior_predictive, observed_data), print a summary "
        "and plot the state trajectories.",
    )
    rd.add_argument("run", help=run_help)
    rd.add_argument("file", help="a UTF-8 text file")
    rd.add_argument("--window", type=int, metavar="W", help="reading window (default: the encoder's)")
    rd.add_argument("--out", default="posterior.nc", help="netCDF file to write (default posterior.nc)")
    rd.add_argument("--plot", metavar="PNG", help="trajectory plot (default: OUT_trajectory.png beside OUT)")
    rd.add_argument("--chains", type=int, default=2, help="independent groups of draws (default 2)")
    rd.add_argument("--draws", type=int, default=50, help="paths per chain (default 50)")
    rd.add_argument("--max-tokens", type=int, metavar="N", help="export the first N positions only")
    rd.add_argument("--seed", type=int, default=0, help="random seed")
    rd.set_defaults(func=_read)

    chat = sub.add_parser(
        "chat",
        help="the writing loop on stdin/stdout, state carried between turns",
        description="Each line on stdin is read with the guide from the carried state and answered "
        "with N tokens written by the model, one line per reply on stdout. Only the latent state is "
        "carried; --save-state/--load-state keep it across sessions.",
    )
    chat.add_argument("run", help=run_help)
    chat.add_argument("--tokens", type=int, default=40, metavar="N", help="tokens per reply (default 40)")
    chat.add_argument("--window", type=int, metavar="W", help="reading window (default: the encoder's)")
    chat.add_argument("--save-state", metavar="FILE", help="write the state at the end (safetensors)")
    chat.add_argument("--load-state", metavar="FILE", help="continue from a saved state")
    _add_sampling_flags(chat)
    chat.set_defaults(func=_chat)


# Model commands add themselves here: each takes the subparsers object, adds its parser and
# sets ``func``.
def _add_data_commands(sub) -> None:
    from vmt.data.cli import add_data_commands

    add_data_commands(sub)


_COMMANDS: list = [_add_model_commands, _add_use_commands, _add_data_commands]


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
    if not args.verbose:
        logging.getLogger("arviz").setLevel(logging.WARNING)  # its backend choice is not news
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        code, message = _exit_code(err)
        logger.error("%s", message)
        return code
