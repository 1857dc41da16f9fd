"""Budgeted piano-roll runs (vmt.music_experiment): validation-based stopping, the CPU budget,
resume, the best model scored on test, and ``vmt fit --model jsb`` on a JSB-format pickle."""

import json
import pickle

import pytest
import torch

from vmt.cli import main
from vmt.experiment import load_json, resolve_config
from vmt.music_experiment import (
    MusicPreset,
    MusicSchedule,
    is_music_preset,
    parse_config,
    run_music,
)

TINY_VMT = {"state_dim": 4, "transition_hidden": 8, "guide_hidden": 8, "emission_hidden": 8,
            "prior_components": 2, "max_window": 32}
TINY_TRAIN = {"steps": 30, "batch_size": 4, "budget": 64, "max_length": 8, "lr_decay_steps": 30,
              "checkpoint_every": 1000, "log_every": 5}


def rolls(count, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 16, (count,), generator=g).tolist()
    return [(torch.rand(n, 88, generator=g) < 0.05).float() for n in lengths]


@pytest.fixture
def splits():
    return {"train": rolls(10, 0), "valid": rolls(3, 1), "test": rolls(3, 2)}


def tiny(**schedule):
    preset = MusicPreset.from_dict({"vmt": TINY_VMT, "reader_hidden": 8})
    data = {"train": TINY_TRAIN, "eval_every": 10, "valid_particles": 2, "test_particles": 4,
            "iwae_particles": 32, "max_cpu_seconds": 600, **schedule}
    return preset, MusicSchedule.from_dict(data)


def test_run_keeps_the_best_validated_model_and_bounds_test(splits, tmp_path):
    preset, schedule = tiny()
    res = run_music(preset, schedule, splits, tmp_path / "run")
    assert res.stopped == "steps" and res.steps == 30
    assert [r["step"] for r in res.curve] == [10, 20, 30]
    best = min(res.curve, key=lambda r: r["valid_neg_elbo"])
    assert res.best_step == best["step"]
    assert res.cpu_seconds > 0 and res.curve[-1]["cpu_seconds"] == pytest.approx(res.cpu_seconds)
    # IWAE-k <= -ELBO of the same draws; the tighter k=32 bound on fresh draws below -ELBO too
    assert res.test.iwae_per_token <= res.test.neg_elbo_per_token
    assert res.iwae.particles == 32 and res.iwae.iwae_per_token <= res.test.neg_elbo_per_token
    stored = json.loads((tmp_path / "run" / "result.json").read_text())
    assert stored["best_step"] == res.best_step and stored["iwae"]["particles"] == 32


def test_a_run_resumes_where_it_stopped_and_a_larger_budget_continues(splits, tmp_path):
    preset, schedule = tiny()
    first = run_music(preset, schedule, splits, tmp_path / "run")
    longer = MusicSchedule(**{**schedule.__dict__, "train": type(schedule.train)(
        **{**schedule.train.__dict__, "steps": 40})})
    second = run_music(preset, longer, splits, tmp_path / "run")
    assert second.steps == 40
    assert second.curve[:3] == first.curve and second.curve[3]["step"] == 40
    assert second.cpu_seconds > first.cpu_seconds


def test_cpu_budget_and_patience_stop_the_run(splits, tmp_path):
    preset, schedule = tiny(max_cpu_seconds=1e-6)
    res = run_music(preset, schedule, splits, tmp_path / "budget")
    assert res.stopped == "cpu budget" and res.steps == 10  # one segment, then the budget is spent
    preset, schedule = tiny(patience=1, train={**TINY_TRAIN, "steps": 200, "learning_rate": 1e-9,
                                               "lr_decay_steps": 0})
    res = run_music(preset, schedule, splits, tmp_path / "patience")
    assert res.stopped == "patience" and res.steps < 200


def test_presets_and_schedules_reject_unknown_or_wrong_settings():
    with pytest.raises(ValueError, match=r"unknown music preset fields \['hidden'\]"):
        MusicPreset.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="derived"):
        MusicPreset.from_dict({"vmt": {"obs_dim": 88}})
    with pytest.raises(ValueError, match="emission 'bernoulli'"):
        MusicPreset.from_dict({"vmt": {"emission": "categorical"}})
    with pytest.raises(ValueError, match=r"unknown vmt fields \['width'\]"):
        MusicPreset.from_dict({"vmt": {"width": 3}})
    with pytest.raises(ValueError, match="max_cpu_seconds must be > 0"):
        MusicSchedule.from_dict({"max_cpu_seconds": 0})
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['epochs'\]"):
        MusicSchedule.from_dict({"train": {"epochs": 3}})


def test_shipped_jsb_preset_and_schedule_parse():
    preset = load_json(resolve_config("jsb", "models"))
    schedule = load_json(resolve_config("jsb-hour", "inference"))
    assert is_music_preset(preset) and is_music_preset(schedule)
    assert isinstance(parse_config(preset, "models"), MusicPreset)
    hour = parse_config(schedule, "inference")
    assert isinstance(hour, MusicSchedule) and hour.max_cpu_seconds <= 3600
    assert hour.train.lr_decay_steps > 0 and hour.iwae_particles == 1000


def test_vmt_fit_trains_the_jsb_preset_on_a_jsb_pickle(tmp_path, capsys):
    data = {name: [[tuple(int(p) + 21 for p in torch.nonzero(row).flatten()) for row in roll] for roll in rs]
            for name, rs in {"train": rolls(6, 0), "valid": rolls(2, 1), "test": rolls(2, 2)}.items()}
    pickle_path = tmp_path / "jsb.pickle"
    pickle_path.write_bytes(pickle.dumps(data))
    schedule = tmp_path / "tiny.json"
    schedule.write_text(json.dumps({"data": "piano-roll", "train": TINY_TRAIN, "eval_every": 2,
                                    "valid_particles": 1, "test_particles": 2}))
    out = tmp_path / "run"
    args = ["fit", "--model", "jsb", "--schedule", str(schedule), "--data", str(pickle_path),
            "--out", str(out), "--steps", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "4 SVI steps" in text and "test" in text and "IWAE-2" in text
    assert (out / "best").exists() and (out / "result.json").is_file()
    assert main(["fit", "--model", "jsb", "--schedule", str(schedule), "--out", str(tmp_path / "x"),
                 "--text", str(schedule)]) == 2


def test_a_shorter_budget_compresses_the_schedule():
    hour = parse_config(load_json(resolve_config("jsb-hour", "inference")), "inference")
    short = hour.with_budget(360)
    assert short.max_cpu_seconds == 360
    assert short.train.steps == round(hour.train.steps / 10)
    assert short.train.lr_decay_steps == round(hour.train.lr_decay_steps / 10)
    assert short.eval_every <= short.train.steps // 10
    assert short.train.learning_rate == hour.train.learning_rate
