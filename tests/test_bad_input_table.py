"""Every input mistake and fault, one row each, through the command line or the API.

A command-line row must exit with code 2 and log exactly one error line that names the
problem, with no traceback (``--debug`` shows one); an API row must raise a one-line error
naming it. Rows that touch files also check what is left on disk.
"""

import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vmt.cli import main

WORDS = ["the cat", "a dog", "sat on", "the mat", "ran off", "and then", "by the door"]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def preset(**changes) -> dict:
    data = {"encoder": {"kind": "gru", "name": "char", "hidden": 8, "window": 16}, "vocab_max_size": 40,
            "vmt": {"state_dim": 2, "prior_components": 1, "transition_hidden": 8, "guide_hidden": 8}}
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer] = {**data[outer], inner: value}
        else:
            data[key] = value
    return data


def schedule(train=None, **changes) -> dict:
    return {"max_train_tokens": 300, "max_test_tokens": 60, "eval_window": 16, "eval_particles": 2,
            **changes, "train": {"steps": 2, "batch_size": 2, "max_length": 6, "budget": 24, "log_every": 1,
                                 "checkpoint_every": 2, "max_skip": 2, **(train or {})}}


def texts(folder: Path, n=5, shift=0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(WORDS[(i + shift + j * j) % len(WORDS)] for j in range(30)))
        out.append(str(path))
    return out


def fit_args(tmp: Path, model=None, sched=None, text=None) -> list[str]:
    return ["fit", "--model", str(write_json(tmp / "model.json", model or preset())),
            "--schedule", str(write_json(tmp / "schedule.json", sched or schedule())),
            "--text", *(text or texts(tmp / "texts"))]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A fitted tiny run (character tokens, 2 steps); each use gets a fresh copy."""
    base = tmp_path_factory.mktemp("fitted")
    assert main([*fit_args(base), "--out", str(base / "run")]) == 0
    count = {"n": 0}

    def copy(tmp: Path) -> Path:
        count["n"] += 1
        target = tmp / f"run{count['n']}"
        shutil.copytree(base / "run", target, symlinks=True)
        for name in ("model.json", "schedule.json"):
            shutil.copy(base / name, tmp / name)
        shutil.copytree(base / "texts", tmp / "texts", dirs_exist_ok=True)
        return target

    return copy


def edit_checkpoint(run: Path, change) -> None:
    path = run / "checkpoint" / "checkpoint.json"  # follows the link to the current version
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(change(meta)))


def the_texts(tmp: Path) -> list[str]:
    return sorted(str(p) for p in (tmp / "texts").glob("doc*.txt"))


def resume_args(tmp: Path, run: Path, sched=None, text=None) -> list[str]:
    return ["fit", "--model", str(tmp / "model.json"),
            "--schedule", str(write_json(tmp / "schedule2.json", sched)) if sched else str(tmp / "schedule.json"),
            "--text", *(text or the_texts(tmp)), "--out", str(run)]


def jsb_pickle(path: Path, pitch=60) -> Path:
    path.write_bytes(pickle.dumps({"train": [[(pitch, 64)]], "valid": [[(60,)]], "test": [[(60,)]]}))
    return path


class _Reduce:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def edited(change, make_argv):
    """A row on a fresh copy of the fitted run whose checkpoint JSON was changed by ``change``."""
    def args(tmp, fitted):
        run = fitted(tmp)
        edit_checkpoint(run, change)
        return make_argv(tmp, run)
    return args


def evaluate_argv(tmp, run):
    return ["evaluate", str(run), "--text", *the_texts(tmp)]


def corrupt_model(tmp, fitted):
    run = fitted(tmp)
    (run / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    return evaluate_argv(tmp, run)


def _swap_optimizer_state(run: Path) -> Path:
    """Give the checkpoint optimizer tensors of other shapes (as if copied from another run)."""
    from safetensors.torch import load_file, save_file

    path = run / "checkpoint" / "optimizer.safetensors"
    tensors = load_file(str(path))
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v for k, v in tensors.items()},
              str(path))
    return run


def mutate(fn):
    def run(meta):
        fn(meta)
        return meta
    return run


@dataclass
class Case:
    id: str
    args: object  # (tmp, fitted) -> argv
    match: str
    check: object = None  # (tmp) -> None: what is left on disk


def _edited_same_size(tmp: Path) -> list[str]:
    text = tmp / "in.txt"
    text.write_text("alpha beta\n\ngamma delta\n")
    assert main(["data", "build", "--text", str(text), "--tokenizer", "char", "--out", str(tmp / "c"), "--quiet"]) == 0
    text.write_text("alpha bexa\n\ngamma delta\n")  # same size, other content
    return ["data", "build", "--text", str(text), "--tokenizer", "char", "--out", str(tmp / "c"), "--quiet"]


def _untouched(name, content):
    def check(tmp):
        assert (tmp / name).read_text() == content
    return check


CLI_CASES = [
    Case("unknown preset name", lambda t, f: ["fit", "--model", "no-such-preset"],
         r"no models configuration 'no-such-preset'"),
    Case("--out is an existing file (fit)",
         lambda t, f: [*fit_args(t), "--out", str(write_json(t / "notes.json", {"mine": 1}))],
         r"run folder .*notes.json is an existing file", _untouched("notes.json", '{"mine": 1}')),
    Case("--out is an existing file (data build)",
         lambda t, f: ["data", "build", "--text", texts(t / "x")[0], "--tokenizer", "char",
                       "--out", str(write_json(t / "notes.json", {"mine": 1}))],
         r"corpus folder .*notes.json is an existing file", _untouched("notes.json", '{"mine": 1}')),
    Case("unknown preset key", lambda t, f: [*fit_args(t, preset(colour="red")), "--out", str(t / "r")],
         r"unknown preset fields \['colour'\]"),
    Case("unknown encoder key", lambda t, f: [*fit_args(t, preset(**{"encoder.depth": 3})), "--out", str(t / "r")],
         r"unknown encoder fields \['depth'\]"),
    Case("unknown vmt key", lambda t, f: [*fit_args(t, preset(**{"vmt.layers": 3})), "--out", str(t / "r")],
         r"unknown vmt fields \['layers'\]"),
    Case("vmt.state_dim as a string",
         lambda t, f: [*fit_args(t, preset(**{"vmt.state_dim": "4"})), "--out", str(t / "r")],
         r"vmt.state_dim must be an integer, got '4'"),
    Case("unknown schedule key", lambda t, f: [*fit_args(t, sched=schedule(epochs=3)), "--out", str(t / "r")],
         r"unknown schedule fields \['epochs'\]"),
    Case("unknown train key", lambda t, f: [*fit_args(t, sched=schedule({"lr": 0.1})), "--out", str(t / "r")],
         r"unknown TrainConfig fields \['lr'\]"),
    Case("steps as a string", lambda t, f: [*fit_args(t, sched=schedule({"steps": "5"})), "--out", str(t / "r")],
         r"steps must be an integer, got '5'"),
    Case("vocab_max_size 0", lambda t, f: [*fit_args(t, preset(vocab_max_size=0)), "--out", str(t / "r")],
         r"vocab_max_size must be an integer >= 2 \(or null\), got 0"),
    Case("vocab_max_size negative", lambda t, f: [*fit_args(t, preset(vocab_max_size=-3)), "--out", str(t / "r")],
         r"vocab_max_size must be an integer >= 2 \(or null\), got -3"),
    Case("encoder.hidden as a string",
         lambda t, f: [*fit_args(t, preset(**{"encoder.hidden": "16"})), "--out", str(t / "r")],
         r"encoder.hidden must be an integer, got '16'"),
    Case("--steps 0", lambda t, f: [*fit_args(t), "--steps", "0", "--out", str(t / "r")],
         r"steps must be >= 1, got 0"),
    Case("clip_norm 0", lambda t, f: [*fit_args(t, sched=schedule({"clip_norm": 0})), "--out", str(t / "r")],
         r"clip_norm must be > 0 \(or null for no clipping\), got 0"),
    Case("clip_norm NaN",
         lambda t, f: [*fit_args(t, sched=schedule({"clip_norm": float("nan")})), "--out", str(t / "r")],
         r"clip_norm must be finite, got nan"),
    Case("negative learning rate",
         lambda t, f: [*fit_args(t, sched=schedule({"learning_rate": -1.0})), "--out", str(t / "r")],
         r"learning_rate must be > 0, got -1.0"),
    Case("Bernoulli emission on text",
         lambda t, f: [*fit_args(t, preset(**{"vmt.emission": "bernoulli"})), "--out", str(t / "r")],
         r"text runs need vmt.emission 'categorical' or 'token' \(token ids\), got 'bernoulli'"),
    Case("preset that is a JSON list",
         lambda t, f: ["fit", "--model", str(write_json(t / "m.json", [1, 2])), "--out", str(t / "r")],
         r"m.json must hold a JSON object, got a list"),
    Case("preset that is not JSON",
         lambda t, f: ["fit", "--model", str(t / "m.json"), "--out", str(t / "r")]
         if (t / "m.json").write_text("{ nope") else None,
         r"m.json is not valid JSON"),
    Case("encoder name that is a missing path",
         lambda t, f: [*fit_args(t, preset(**{"encoder.kind": "lm", "encoder.name": "./nowhere/lm"})),
                       "--out", str(t / "r")],
         r"no language model folder at ./nowhere/lm"),
    Case("data build with an unknown tokenizer path",
         lambda t, f: ["data", "build", "--text", texts(t / "x")[0], "--tokenizer", "./nosuch", "--out", str(t / "c")],
         r"no tokenizer folder at ./nosuch"),
    Case("invalid UTF-8 text",
         lambda t, f: [*fit_args(t, text=[str(t / "bad.txt")]), "--out", str(t / "r")]
         if (t / "bad.txt").write_bytes(b"caf\xe9 ok") else None,
         r"bad.txt is not valid utf-8 text \(byte 3"),
    Case("missing text file", lambda t, f: [*fit_args(t, text=[str(t / "gone.txt")]), "--out", str(t / "r")],
         r"no text file at .*gone.txt"),
    Case("only empty text files",
         lambda t, f: [*fit_args(t, text=[str(t / "e1.txt"), str(t / "e2.txt")]), "--out", str(t / "r")]
         if not (t / "e1.txt").write_text("") and not (t / "e2.txt").write_text("") else None,
         r"none of the 2 texts has 2 or more tokens"),
    Case("resume with other --text files",
         lambda t, f: resume_args(t, f(t), text=texts(t / "other", shift=3)),
         r"cannot resume .*: the training data or vocabulary changed \((corpus.fingerprint|vocabulary)"),
    Case("resume with a new learning rate",
         lambda t, f: resume_args(t, f(t), sched=schedule({"learning_rate": 0.01})),
         r"the training schedule changed \(train_config.learning_rate: 0.003 -> 0.01\); pass --accept-schedule"),
    Case("resume with a new batch size",
         lambda t, f: resume_args(t, f(t), sched=schedule({"batch_size": 3})),
         r"the run's settings changed \(train_config.batch_size: 2 -> 3\); pass --restart"),
    Case("resume after changing only eval_window",
         lambda t, f: resume_args(t, f(t), sched=schedule(eval_window=128)),
         r"the run's settings changed \(schedule.eval_window: 16 -> 128\)"),
    Case("resume with optimizer state from another config",
         edited(mutate(lambda m: m["optimizer"]["param_groups"][0].__setitem__("params", [0, 1])), resume_args),
         r"its optimizer state does not fit this model"),
    Case("resume with optimizer tensors of another model",
         lambda t, f: resume_args(t, _swap_optimizer_state(f(t))),
         r"its optimizer state does not fit this model \(exp_avg"),
    Case("resume from a checkpoint.json that is a list",
         edited(lambda m: [m], resume_args),
         r"checkpoint.json holds a list, not an object"),
    Case("evaluate a folder that is not a run", lambda t, f: ["evaluate", str(t)],
         r"is not a vmt checkpoint \(no checkpoint.json\)"),
    Case("evaluate a checkpoint.json that is a list",
         edited(lambda m: [m], evaluate_argv),
         r"checkpoint.json holds a list, not an object"),
    Case("evaluate without the preset entry",
         edited(mutate(lambda m: m.pop("preset")), evaluate_argv),
         r"has no \['preset'\] entries: it was not written by `vmt fit`"),
    Case("evaluate with a vocabulary entry that is a string",
         edited(mutate(lambda m: m["vocabulary"].__setitem__(0, "x")), evaluate_argv),
         r"vocabulary ids must be integers, got 'x'"),
    Case("evaluate with a vocabulary shorter than obs_dim",
         edited(mutate(lambda m: m.__setitem__("vocabulary", m["vocabulary"][:-10])), evaluate_argv),
         r"its vocabulary has \d+ entries \(with <unk>\) but the model emits \d+"),
    Case("evaluate a text run without --text", lambda t, f: ["evaluate", str(f(t))],
         r"was fitted on your text files; pass the same files with --text"),
    Case("evaluate with other --text files",
         lambda t, f: ["evaluate", str(f(t)), "--text", *texts(t / "other", shift=3)],
         r"the text files differ from the ones .* was fitted on"),
    Case("evaluate a corrupt model file", corrupt_model,
         r"corrupt checkpoint file .*model.safetensors"),
    Case("bench chorales --data on a non-pickle file",
         lambda t, f: ["bench", "chorales", "--quick", "--no-docs", "--figures", str(t / "fig"),
                       "--data", str(write_json(t / "jsb.pkl", {"a": 1}))],
         r"jsb.pkl is not a JSB-format pickle"),
    Case("bench chorales --data on a malicious pickle",
         lambda t, f: ["bench", "chorales", "--quick", "--no-docs", "--figures", str(t / "fig"), "--data",
                       str(t / "evil.pkl")] if (t / "evil.pkl").write_bytes(pickle.dumps(_Reduce())) else None,
         r"evil.pkl: refusing to load global (posix|os|nt).system"),
    Case("bench chorales --data with a pitch of 60.7",
         lambda t, f: ["bench", "chorales", "--quick", "--no-docs", "--figures", str(t / "fig"),
                       "--data", str(jsb_pickle(t / "jsb.pkl", 60.7))],
         r"train sequence 0: MIDI pitch 60.7 at step 0 is not an integer"),
    Case("data build after its input was edited to the same size", lambda t, f: _edited_same_size(t),
         r"holds a different build \(sources differ\)"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_command_line_input_errors(case, tmp_path, fitted, caplog, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.args(tmp_path, fitted)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2, errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert re.search(case.match, errors[0]), errors[0]
    assert "Traceback" not in capsys.readouterr().err
    if case.check is not None:
        case.check(tmp_path)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no models configuration"):
        main(["fit", "--model", "no-such-preset", "--debug"])


def test_an_unexpected_error_is_one_line_with_exit_1(tmp_path, monkeypatch, caplog):
    import vmt.experiment

    def broken(*args, **kwargs):
        raise RuntimeError("something\ninside broke")

    monkeypatch.setattr(vmt.experiment, "run_text", broken)
    assert main([*fit_args(tmp_path), "--out", str(tmp_path / "r")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["internal error (RuntimeError: something inside broke); run again with --debug for the traceback"]


# -- the API ---------------------------------------------------------------------------------------
def tiny_vmt(emission="categorical", obs_dim=6):
    from vmt.models import VariationalMarkovTransformer, VMTConfig

    return VariationalMarkovTransformer(VMTConfig(state_dim=2, obs_dim=obs_dim, feature_dim=4, guide_hidden=8,
                                                  transition_hidden=8, emission=emission))


def _feature_lookup_too_short():
    from vmt.inference.subsequences import SubsequenceSampler

    docs = [torch.randint(0, 6, (12,))]
    SubsequenceSampler(docs, lambda i: (torch.zeros(5, 4), torch.ones(5, dtype=torch.long)),
                       torch.Generator().manual_seed(0)).sample(1, 4)


def _batch(obs):
    from vmt.models import ChainBatch

    rows, steps = obs.shape[:2]
    return ChainBatch(obs=obs, start=torch.zeros(rows, dtype=torch.long), end=torch.full((rows,), steps),
                      features=torch.randn(rows, steps, 4))


def _elbo(vmt, obs):
    from vmt.inference.elbo import elbo_terms

    elbo_terms(vmt, _batch(obs))


def _evaluate_empty():
    from vmt.inference.evaluate import evaluate

    evaluate(tiny_vmt(), [torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.long)],
             lambda i: (torch.zeros(3, 4), torch.ones(3, dtype=torch.long)), window=4, particles=1)


def _fit_into(path):
    from vmt.inference.train import TrainConfig, fit

    fit(tiny_vmt(), [torch.randint(0, 6, (8,))], TrainConfig(steps=1, batch_size=1, max_length=4, budget=8),
        lambda i: (torch.zeros(8, 4), torch.ones(8, dtype=torch.long)), checkpoint_dir=path, progress=False)


def _checkpoint_json_list(tmp):
    from vmt.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp / "ck", tiny_vmt())
    (tmp / "ck" / "checkpoint.json").write_text("[]")
    load_checkpoint(tmp / "ck")


def _train_config(**kw):
    from vmt.inference.train import TrainConfig

    TrainConfig(**kw)


def _vocab(kept):
    from vmt.data.vocab import Vocabulary

    Vocabulary(kept, 10)


def _pitch():
    from vmt.data.music import pitches_to_roll

    pitches_to_roll([(60, 64), (60.7,)])


API_CASES = [
    ("feature lookup shorter than its document", lambda t: _feature_lookup_too_short(),
     r"the feature lookup gave 5 positions for document 0 of 12 tokens"),
    ("one-hot floats for a categorical model",
     lambda t: _elbo(tiny_vmt(), torch.nn.functional.one_hot(torch.randint(0, 6, (2, 5)), 6).float()),
     r"a categorical emission takes \(batch, time\) integer token ids, got torch.float32"),
    ("int64 piano rolls for a Bernoulli model",
     lambda t: _elbo(tiny_vmt("bernoulli", 88), torch.randint(0, 2, (2, 5, 88))),
     r"a bernoulli emission takes float \(batch, time, obs\) observations, got torch.int64"),
    ("evaluate a zero-length document", lambda t: _evaluate_empty(),
     r"cannot evaluate empty documents \(indices \[1\]\)"),
    ("JSB pitch 60.7", lambda t: _pitch(), r"MIDI pitch 60.7 at step 1 is not an integer"),
    ("fit into an existing file", lambda t: _fit_into((t / "mine.txt", (t / "mine.txt").write_text("keep"))[0]),
     r"mine.txt is an existing file"),
    ("checkpoint.json that is a list", _checkpoint_json_list, r"checkpoint.json holds a list, not an object"),
    ("clip_norm 0", lambda t: _train_config(clip_norm=0.0), r"clip_norm must be > 0"),
    ("clip_norm NaN", lambda t: _train_config(clip_norm=float("nan")), r"clip_norm must be finite"),
    ("steps 0", lambda t: _train_config(steps=0), r"steps must be >= 1, got 0"),
    ("steps as a string", lambda t: _train_config(steps="5"), r"steps must be an integer, got '5'"),
    ("vocabulary id that is a string", lambda t: _vocab((1, "2")), r"vocabulary ids must be integers, got '2'"),
]


@pytest.mark.parametrize("name,call,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_input_errors(name, call, match, tmp_path):
    with pytest.raises(ValueError, match=match) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)
    if name == "fit into an existing file":
        assert (tmp_path / "mine.txt").read_text() == "keep" and len(list(tmp_path.iterdir())) == 1


def test_copies_of_a_document_never_reach_the_held_out_split(caplog):
    from vmt.data.corpus import CharTokenizer, tokenize

    texts_ = [f"document number {i} " * 5 for i in range(8)]
    corpus = tokenize(texts_ + [texts_[0], texts_[0]], CharTokenizer())
    with caplog.at_level(logging.WARNING):
        train, valid, test = corpus.split(0.2, 0.2, seed=0)
    assert "2 of 10 documents are copies of others" in caplog.text
    seen = {tuple(d.tolist()) for d in train.documents}
    assert len(train) + len(valid) + len(test) == 8
    assert not seen & {tuple(d.tolist()) for d in valid.documents + test.documents}
