"""Fault injection: nothing is lost and nothing non-finite is written, whatever stops a run.

* a kill at every filesystem step of a checkpoint save (monkeypatched renames) resumes from
  the newest complete checkpoint;
* SIGTERM and SIGINT mid-run keep a checkpoint and exit non-zero without evaluating;
* a NaN at step k keeps the checkpoint from before k and no NaN tensor on disk;
* a second concurrent run into the same folder is refused, naming the holder.
"""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vmt.checkpoint import RunLock, find_checkpoint, load_checkpoint, save_checkpoint, versions_dir
from vmt.inference.train import TrainConfig, Trainer, fit
from vmt.models import VariationalMarkovTransformer, VMTConfig

VOCAB = 6


def tiny_vmt():
    config = VMTConfig(state_dim=2, obs_dim=VOCAB, feature_dim=8, guide_hidden=8,
                       transition_hidden=8, prior_components=1, max_window=16)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": 8, "vocab_size": VOCAB}}
    return VariationalMarkovTransformer(config, reader_spec=spec)


def documents(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (12,), generator=g) for _ in range(n)]


def config(**kw):
    base = dict(steps=4, batch_size=2, max_length=6, budget=32, log_every=1, checkpoint_every=2, max_skip=2)
    return TrainConfig(**{**base, **kw})


def every_tensor_on_disk(folder):
    """Every tensor of every safetensors file under ``folder`` (all versions and leftovers)."""
    for file in folder.rglob("*.safetensors"):
        yield from load_file(str(file)).items()


# -- a kill at each step of the save ------------------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no cleanup either, see the fixture)."""


def _count_fs_steps(tmp_path):
    calls = []
    real = {name: getattr(os, name) for name in ("rename", "replace", "symlink")}
    vmt = tiny_vmt()
    save_checkpoint(tmp_path / "probe", vmt, meta={"step": 1})
    save_checkpoint(tmp_path / "probe", vmt, meta={"step": 2})  # a third save also prunes
    try:
        for name, fn in real.items():
            setattr(os, name, lambda *a, _n=name, _f=fn, **k: (calls.append(_n), _f(*a, **k))[1])
        save_checkpoint(tmp_path / "probe", vmt, meta={"step": 3})
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
    return len(calls)


def _save_killed_at(trainer, k, when, monkeypatch):
    """``trainer.save()`` killed just before or after its ``k``-th rename/replace/symlink."""
    import vmt.checkpoint as ck

    calls = {"n": 0}
    real = {name: getattr(os, name) for name in ("rename", "replace", "symlink")}

    def killing(name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] - 1 == k and when == "before":
            raise Killed
        out = real[name](*args, **kwargs)
        if calls["n"] - 1 == k and when == "after":
            raise Killed
        return out

    with monkeypatch.context() as m:
        for name in real:
            m.setattr(os, name, lambda *a, _n=name, **kw: killing(_n, *a, **kw))
        m.setattr(ck.shutil, "rmtree", lambda *a, **kw: None)  # a killed process cleans nothing
        with pytest.raises(Killed):
            trainer.save()


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_at_any_step_of_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path, monkeypatch, when):
    steps = _count_fs_steps(tmp_path)
    assert steps >= 4  # version rename, link, link replace, pruning
    for k in range(steps):
        folder = tmp_path / f"kill{k}"
        trainer = Trainer(tiny_vmt(), documents(), config(steps=2), checkpoint_dir=folder / "ck")
        assert trainer.fit(progress=False).stopped == "completed"  # checkpoints of steps 2 (twice)
        trainer.config = config(steps=3)
        trainer.train_step(1.0)  # step 3 in memory
        _save_killed_at(trainer, k, when, monkeypatch)
        # the version folder is complete once renamed (call 0): from then on step 3 is newest
        expected = 3 if (k > 0 or when == "after") else 2
        assert load_checkpoint(folder / "ck").meta["step"] == expected, (k, when)
        resumed = Trainer(tiny_vmt(), documents(), config(steps=5), checkpoint_dir=folder / "ck")
        assert resumed.resume() and resumed.step == expected
        assert resumed.fit(progress=False).stopped == "completed"
        # the next save leaves the link, at most two versions, and no leftovers
        assert load_checkpoint(folder / "ck").meta["step"] == 5
        left = sorted(p.name for p in versions_dir(folder / "ck").iterdir())
        assert len(left) <= 2 and all(name.isdigit() for name in left), left


def test_leftovers_of_the_one_folder_layout_are_recovered_not_deleted(tmp_path):
    # the earlier layout's window: the old checkpoint moved aside, the new one complete in a
    # temporary folder, nothing at the path itself
    fit(tiny_vmt(), documents(), config(steps=2), checkpoint_dir=tmp_path / "a", progress=False)
    fit(tiny_vmt(), documents(), config(steps=4), checkpoint_dir=tmp_path / "b", progress=False)
    os.rename(os.path.realpath(tmp_path / "a"), tmp_path / ".ck.old")
    os.rename(os.path.realpath(tmp_path / "b"), tmp_path / ".ck.x7f3q")
    assert find_checkpoint(tmp_path / "ck") == tmp_path / ".ck.x7f3q"
    trainer = Trainer(tiny_vmt(), documents(), config(steps=6), checkpoint_dir=tmp_path / "ck")
    assert trainer.resume() and trainer.step == 4
    trainer.fit(progress=False)
    assert load_checkpoint(tmp_path / "ck").meta["step"] == 6
    assert not (tmp_path / ".ck.old").exists() and not (tmp_path / ".ck.x7f3q").exists()


def test_an_existing_file_as_checkpoint_folder_is_refused_untouched(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is an existing file"):
        fit(tiny_vmt(), documents(), config(), checkpoint_dir=target, progress=False)
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    other = tmp_path / "papers"
    other.mkdir()
    (other / "draft.tex").write_text("x")
    with pytest.raises(ValueError, match="holds files that are not a vmt checkpoint"):
        save_checkpoint(other, tiny_vmt())
    assert (other / "draft.tex").read_text() == "x"


# -- non-finite training ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 5])
def test_nan_at_step_k_keeps_the_checkpoint_before_k_and_no_nan_on_disk(tmp_path, monkeypatch, k):
    trainer = Trainer(tiny_vmt(), documents(), config(steps=8), checkpoint_dir=tmp_path / "ck")
    real_step = trainer.optimizer.step

    def poisoning():
        real_step()
        if trainer.step + 1 == k:  # the optimiser step of step k writes a NaN weight
            with torch.no_grad():
                trainer.vmt.emission.net.bias[0] = float("nan")

    monkeypatch.setattr(trainer.optimizer, "step", poisoning)
    result = trainer.fit(progress=False)
    last = 2 * ((k - 1) // 2)
    assert not result.ok and result.steps == k - 1
    assert f"non-finite parameter emission.net.bias after step {k}" in result.stopped
    assert f"kept: the checkpoint of step {last}" in result.stopped
    assert load_checkpoint(tmp_path / "ck").meta["step"] == last
    assert all(not v.is_floating_point() or bool(torch.isfinite(v).all())
               for _, v in every_tensor_on_disk(tmp_path))


def test_divergence_before_the_first_checkpoint_says_nothing_was_kept(tmp_path):
    vmt = tiny_vmt()
    with torch.no_grad():
        vmt.emission.net.bias.fill_(float("nan"))
    result = fit(vmt, documents(), config(), checkpoint_dir=tmp_path / "ck", progress=False)
    assert "non-finite loss" in result.stopped and "no checkpoint was written" in result.stopped
    assert result.checkpoint is None and find_checkpoint(tmp_path / "ck") is None
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_huge_learning_rate_ends_in_the_non_finite_stop_not_a_distribution_error(tmp_path):
    result = fit(tiny_vmt(), documents(), config(steps=40, learning_rate=300.0, checkpoint_every=100),
                 checkpoint_dir=tmp_path / "ck", progress=False)
    assert not result.ok and result.steps < 40
    assert any(s in result.stopped for s in ("non-finite", "invalid distribution parameters"))
    assert "no checkpoint was written" in result.stopped
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_non_finite_model_is_never_saved(tmp_path):
    vmt = tiny_vmt()
    with torch.no_grad():
        next(vmt.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="refusing to save non-finite tensors"):
        save_checkpoint(tmp_path / "ck", vmt)
    assert find_checkpoint(tmp_path / "ck") is None


# -- resume with an accepted schedule change ----------------------------------------------------------
def test_an_accepted_learning_rate_change_reaches_the_optimizer(tmp_path):
    fit(tiny_vmt(), documents(), config(steps=2), checkpoint_dir=tmp_path / "ck", progress=False)
    changed = config(steps=3, learning_rate=1e-4)
    with pytest.raises(ValueError, match=r"train_config.learning_rate: 0.003 -> 0.0001"):
        Trainer(tiny_vmt(), documents(), changed, checkpoint_dir=tmp_path / "ck").resume()
    trainer = Trainer(tiny_vmt(), documents(), changed, checkpoint_dir=tmp_path / "ck")
    assert trainer.resume(accept_schedule=True)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4]


# -- signals and locks through the command line ---------------------------------------------------------
def tiny_run_files(tmp_path, steps=50):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps({
        "encoder": {"kind": "gru", "name": "char", "hidden": 8, "window": 16}, "vocab_max_size": 40,
        "vmt": {"state_dim": 2, "prior_components": 1, "transition_hidden": 8, "guide_hidden": 8},
    }))
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps({
        "max_train_tokens": 300, "max_test_tokens": 60, "eval_window": 16, "eval_particles": 2,
        "train": {"steps": steps, "batch_size": 2, "max_length": 6, "budget": 24, "log_every": 1,
                  "checkpoint_every": 2, "max_skip": 2},
    }))
    texts = []
    words = ["the cat", "a dog", "sat on", "the mat", "ran off", "and then"]
    for i in range(5):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(" ".join(words[(i + j * j) % len(words)] for j in range(30)))
        texts.append(str(path))
    return ["--model", str(model), "--schedule", str(schedule), "--text", *texts]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_saves_and_exits_non_zero_without_evaluating(tmp_path, monkeypatch, caplog, sig, code):
    from vmt.cli import main

    real = Trainer.train_step

    def signalling(self, annealing):
        out = real(self, annealing)
        if self.step == 3:
            os.kill(os.getpid(), sig)  # delivered to this (main) thread, as from `kill` or Ctrl-C
        return out

    monkeypatch.setattr(Trainer, "train_step", signalling)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["fit", *tiny_run_files(tmp_path), "--out", str(out)]) == code
    # the step under way finishes, is saved, and nothing is evaluated
    assert load_checkpoint(out / "checkpoint").meta["step"] == 3
    assert not (out / "results.json").exists() and not (out / "training_curve.png").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"interrupted ({sig.name}) at step 3; checkpoint saved to {out / 'checkpoint'}; "
                      "run the same command again to resume"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored


def test_same_command_twice_gives_the_same_first_loss(tmp_path):
    from vmt.experiment import ModelPreset, Schedule, run_text

    args = tiny_run_files(tmp_path, steps=1)
    preset = ModelPreset.from_dict(json.loads(Path(args[1]).read_text()))
    schedule = Schedule.from_dict(json.loads(Path(args[3]).read_text()))
    texts = [Path(p).read_text() for p in args[5:]]
    losses = []
    for run in ("a", "b"):
        torch.manual_seed(hash(run) % 1000)  # whatever the process did before
        result = run_text(preset, schedule, tmp_path / run, texts, "user-text", progress=False)
        losses.append(result.train.history[0]["loss"])
    assert losses[0] == losses[1] and math.isfinite(losses[0])


def test_a_second_concurrent_run_is_refused_naming_the_holder(tmp_path, caplog):
    from vmt.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from vmt.checkpoint import RunLock
            with RunLock({str(out / ".vmt-run.lock")!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["fit", *tiny_run_files(tmp_path, steps=2), "--out", str(out)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [f"{out} is in use by another vmt run (pid {holder.pid}); "
                          "wait for it to finish or choose another folder"]
        assert not (out / "checkpoint").exists()
    finally:
        holder.kill()  # like SIGKILL of a real run: the lock dies with it
        holder.wait()
        holder.stdout.close()
    caplog.clear()
    assert main(["fit", *tiny_run_files(tmp_path, steps=2), "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint").meta["step"] == 2


def test_the_checkpoint_folder_itself_is_locked(tmp_path):
    with RunLock(tmp_path / ".ck.lock"):
        with pytest.raises(ValueError, match=rf"in use by another vmt run \(pid {os.getpid()}\)"):
            fit(tiny_vmt(), documents(), config(), checkpoint_dir=tmp_path / "ck", progress=False)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_vmt(), documents(), config(steps=8), checkpoint_dir=tmp_path / "ck")
    real = trainer.train_step

    def twice(annealing):
        if trainer.step == 3:  # half-way through step 4: a first and a second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(annealing)

    monkeypatch.setattr(trainer, "train_step", twice)
    # a known handler before the run (a background job may start with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = trainer.fit(progress=False)
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.stopped == "interrupted" and result.signal == "SIGINT" and result.steps == 3
    assert load_checkpoint(tmp_path / "ck").meta["step"] == 2  # the half-done step is not saved
    assert restored is signal.default_int_handler


def test_the_distributed_trainer_refuses_other_settings_too(tmp_path):
    from vmt.inference.distributed import distributed_fit

    done = distributed_fit(tiny_vmt(), documents(), config(steps=2), checkpoint_dir=tmp_path / "ck", progress=False)
    assert done.ok and load_checkpoint(tmp_path / "ck").meta["step"] == 2
    with pytest.raises(ValueError, match=r"the run's settings changed \(train_config.max_length: 6 -> 7\)"):
        distributed_fit(tiny_vmt(), documents(), config(steps=3, max_length=7), checkpoint_dir=tmp_path / "ck",
                        progress=False)
    # the stream layout may change (the streams restart)
    again = distributed_fit(tiny_vmt(), documents(), config(steps=3, batch_size=3), checkpoint_dir=tmp_path / "ck",
                            progress=False)
    assert again.ok and again.steps == 3
