"""``vmt sample``, ``vmt read`` and ``vmt chat`` on a tiny fitted run, and their errors.

The run is fitted once per module the way ``make demo`` fits one (a frozen SmolLM2 read in
reverse, compact vocabulary, reverse parts trained after the forward model), at toy sizes.
"""

import io
import json
import logging
import shutil
import sys

import pytest
import torch

from vmt.cli import main

PROMPT = "The return statement leaves the current function call"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fitted run folder with checkpoint/ and checkpoint-with-reverse/."""
    root = tmp_path_factory.mktemp("use")
    model = root / "tiny.json"
    model.write_text(json.dumps({
        "encoder": {"kind": "lm", "layer": 2, "window": 32},
        "vocab_max_size": 300,
        "vmt": {"state_dim": 4, "prior_components": 2, "transition_hidden": 16, "guide_hidden": 16,
                "reverse": True},
    }))
    schedule = root / "tiny-schedule.json"
    schedule.write_text(json.dumps({
        "max_train_tokens": 800, "max_test_tokens": 150, "eval_window": 32, "eval_particles": 2,
        "reverse_steps": 3,
        "train": {"steps": 4, "batch_size": 2, "max_length": 8, "budget": 64, "log_every": 2},
    }))
    out = root / "run"
    assert main(["fit", "--model", str(model), "--schedule", str(schedule), "--out", str(out)]) == 0
    assert (out / "checkpoint-with-reverse" / "checkpoint.json").is_file()
    return out


@pytest.fixture(scope="module")
def forward_only_run(run, tmp_path_factory):
    """The same run without its reverse parts."""
    out = tmp_path_factory.mktemp("forward") / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoint-with-reverse"))
    return out


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- vmt sample ------------------------------------------------------------------------------
@pytest.mark.lm
@pytest.mark.integration
def test_sample_continues_a_prompt_reproducibly(run, capsys):
    from vmt.usage import load_run, sample_text

    args = ["sample", str(run), "--prompt", PROMPT, "--tokens", "6", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert main([*args[:-1], "4"]) == 0
    other = capsys.readouterr().out
    assert lines(first) and lines(other)
    # the command prints what the library writes
    assert first == sample_text(load_run(run), PROMPT, num_tokens=6, seed=3)[0] + "\n"


@pytest.mark.lm
@pytest.mark.integration
def test_sample_from_a_prompt_file_in_reverse_and_unconditionally(run, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT + "\n", encoding="utf-8")
    assert main(["sample", str(run), "--prompt-file", str(prompt), "--tokens", "5", "--reverse"]) == 0
    assert lines(capsys.readouterr().out)
    assert main(["sample", str(run), "--unconditional", "--tokens", "5", "--samples", "3",
                 "--temperature", "0.8", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 3
    assert main(["sample", str(run), "--unconditional", "--reverse", "--tokens", "5"]) == 0
    assert lines(capsys.readouterr().out)


@pytest.mark.lm
@pytest.mark.integration
def test_prequel_is_written_backward_from_the_first_state(run):
    """The prequel's last token is drawn from the state that precedes the prompt's first one."""
    from vmt.inference.generation import SamplingConfig, write_prequel
    from vmt.inference.reading import ReadConfig, read
    from vmt.usage import load_run, sample_text

    fitted = load_run(run, reverse=True)
    text = sample_text(fitted, PROMPT, num_tokens=4, reverse=True, seed=5)[0]
    torch.manual_seed(5)
    res = read(fitted.vmt, fitted.encode(PROMPT), ReadConfig(window=fitted.window, keep_path=True),
               fitted.feature_fn)
    expected = write_prequel(fitted.vmt, res.path[:, 0], 4, SamplingConfig())
    assert text == fitted.decode(expected.tokens[0])


# -- vmt read --------------------------------------------------------------------------------
@pytest.mark.lm
@pytest.mark.integration
def test_read_exports_posterior_states_to_netcdf(run, tmp_path, capsys):
    import xarray as xr

    from vmt.usage import load_run

    text = tmp_path / "doc.txt"
    body = ("Assignment statements are used to (re)bind names to values and to modify attributes "
            "or items of mutable objects. ") * 2
    text.write_text(body, encoding="utf-8")
    out = tmp_path / "posterior.nc"
    assert main(["read", str(run), str(text), "--window", "16", "--out", str(out), "--chains", "2",
                 "--draws", "6", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "nats/token" in printed and "R-hat" in printed and str(out) in printed
    fitted = load_run(run)
    n = fitted.lm_ids(body).numel()
    assert n > 16  # more than one window
    tree = xr.open_datatree(out, engine="h5netcdf")
    assert set(tree.children) == {"posterior", "log_likelihood", "posterior_predictive", "observed_data"}
    x = tree["posterior"]["x"]
    assert x.dims == ("chain", "draw", "time", "state") and x.shape == (2, 6, n, 4)
    assert torch.isfinite(torch.as_tensor(x.values)).all()
    tokens = [fitted.tokenizer.decode([int(t)]) for t in fitted.lm_ids(body)]
    assert list(tree["posterior"]["token"].values) == tokens
    assert (tree["observed_data"]["y"].values == fitted.encode(body).numpy()).all()
    assert (tmp_path / "posterior_trajectory.png").stat().st_size > 0
    tree.close()


# -- vmt chat --------------------------------------------------------------------------------
@pytest.mark.lm
@pytest.mark.integration
def test_chat_answers_each_line_and_keeps_the_state(run, tmp_path, capsys, monkeypatch):
    state = tmp_path / "state.safetensors"
    script = "What does the return statement do?\n\n   \nAnd the yield statement?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", str(run), "--tokens", "5", "--save-state", str(state), "--seed", "2"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2  # one line per non-blank turn
    assert state.is_file()
    monkeypatch.setattr(sys, "stdin", io.StringIO("And the pass statement?\n"))
    assert main(["chat", str(run), "--tokens", "5", "--load-state", str(state), "--save-state",
                 str(state)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    from safetensors import safe_open

    with safe_open(str(state), framework="pt") as f:
        assert f.metadata()["turns"] == "3"


@pytest.mark.lm
@pytest.mark.integration
def test_a_saved_state_continues_the_conversation_exactly(run, tmp_path):
    """Saving after a turn and loading into a new session answers the next turn as the
    uninterrupted session does (same seed): the state is all that is carried."""
    from vmt.usage import ChatSession, load_run

    fitted = load_run(run)
    session = ChatSession(fitted, reply_tokens=4)
    torch.manual_seed(0)
    session.turn("What does the return statement do?\n")
    path = session.save_state(tmp_path / "s.safetensors")
    torch.manual_seed(1)
    uninterrupted = session.turn("And the yield statement?\n")
    resumed = ChatSession(fitted, reply_tokens=4)
    resumed.load_state(path)
    torch.manual_seed(1)
    assert resumed.turn("And the yield statement?\n") == uninterrupted
    fresh = ChatSession(fitted, reply_tokens=4)
    torch.manual_seed(1)
    fresh.turn("And the yield statement?\n")
    assert not torch.equal(fresh.conversation.state, resumed.conversation.state)


# -- errors ----------------------------------------------------------------------------------
def one_error(caplog, expected: str) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and expected in message, message


@pytest.fixture
def files(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    return {"missing": str(tmp_path / "nope.txt"), "binary": str(binary), "empty": str(empty),
            "dir": str(tmp_path), "run": str(tmp_path / "no-run")}


BAD = [  # (arguments, part of the one-line error); these fail before any model is loaded
    (["sample", "{run}", "--prompt", "x"], "no run folder"),
    (["sample", "{run}", "--prompt-file", "{missing}"], "does not exist"),
    (["sample", "{run}", "--prompt-file", "{binary}"], "is not UTF-8 text"),
    (["sample", "{run}", "--prompt-file", "{empty}"], "is empty"),
    (["sample", "{run}", "--prompt-file", "{dir}"], "is not a file"),
    (["sample", "{run}", "--prompt", "x", "--tokens", "-3"], "--tokens must be a positive integer, got -3"),
    (["sample", "{run}", "--prompt", "x", "--temperature", "0"], "temperature must be > 0"),
    (["sample", "{run}"], "give --prompt TEXT, --prompt-file FILE or --unconditional"),
    (["sample", "{run}", "--unconditional", "--prompt", "x"], "--unconditional writes without a prompt"),
    (["read", "{run}", "{missing}"], "does not exist"),
    (["read", "{run}", "{binary}"], "is not UTF-8 text"),
    (["read", "{run}", "{empty}", "--draws", "0"], "--draws must be a positive integer"),
    (["read", "{run}", "{empty}"], "is empty"),
    (["chat", "{run}"], "no run folder"),
    (["chat", "{run}", "--tokens", "0"], "--tokens must be a positive integer, got 0"),
    (["chat", "{run}", "--load-state", "{missing}"], "no state file"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_arguments_give_one_line_errors_and_exit_code_2(args, expected, files, capsys, caplog):
    assert main([a.format(**files) for a in args]) == 2
    one_error(caplog, expected)
    assert capsys.readouterr().out == ""


def test_read_without_a_netcdf_writer_is_a_one_line_error(files, tmp_path, monkeypatch, capsys, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("h5netcdf", "h5py", "netCDF4") else real(name, *a))
    text = tmp_path / "doc.txt"
    text.write_text("Some text.\n")
    assert main(["read", files["run"], str(text)]) == 2
    one_error(caplog, "needs h5netcdf (with h5py) or netCDF4")
    assert capsys.readouterr().out == ""


@pytest.mark.lm
@pytest.mark.integration
def test_reverse_on_a_run_without_reverse_parts_is_refused(forward_only_run, capsys, caplog):
    assert main(["sample", str(forward_only_run), "--prompt", "x", "--reverse"]) == 2
    one_error(caplog, "has no trained reverse parts")
    assert capsys.readouterr().out == ""
    # and the forward commands still work on it
    assert main(["sample", str(forward_only_run), "--prompt", PROMPT, "--tokens", "3"]) == 0


@pytest.mark.lm
@pytest.mark.integration
def test_a_state_from_another_model_is_refused(run, tmp_path, capsys, caplog, monkeypatch):
    from safetensors.torch import save_file

    from vmt.usage import STATE_FORMAT

    state = tmp_path / "other.safetensors"
    save_file({"state": torch.zeros(1, 4)}, str(state), metadata={"format": STATE_FORMAT, "run": "0" * 16})
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(run), "--load-state", str(state)]) == 2
    one_error(caplog, "was saved by another model")
    assert capsys.readouterr().out == ""
