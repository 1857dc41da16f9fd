"""The command line end to end at toy sizes: fit, evaluate (from the checkpoint alone), bench."""

import json

import pytest
import torch

from vmt.cli import main


@pytest.mark.lm
@pytest.mark.integration
def test_fit_then_evaluate_from_the_checkpoint(tmp_path, capsys):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps({
        "encoder": {"kind": "gru", "hidden": 16, "window": 32},
        "vocab_max_size": 200,
        "vmt": {"state_dim": 4, "prior_components": 2, "transition_hidden": 16, "guide_hidden": 16},
    }))
    schedule = tmp_path / "tiny-schedule.json"
    schedule.write_text(json.dumps({
        "max_train_tokens": 600, "max_test_tokens": 150, "eval_window": 32, "eval_particles": 2,
        "train": {"steps": 6, "batch_size": 2, "max_length": 8, "budget": 64, "log_every": 2,
                  "checkpoint_every": 3},
    }))
    out = tmp_path / "run"
    assert main(["fit", "--model", str(model), "--schedule", str(schedule), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "negative ELBO" in printed and "IWAE-2" in printed
    for part in ("reconstruction", "KL", "out-of-vocabulary", "explained variance", "active units"):
        assert part in printed
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 6 and (out / "training_curve.png").stat().st_size > 0
    assert main(["evaluate", str(out), "--particles", "2"]) == 0
    printed = capsys.readouterr().out
    assert "nats/token" in printed and "reconstruction" in printed and "explained variance" in printed
    test = results["test"]
    assert test["neg_elbo_per_token"] == pytest.approx(
        test["reconstruction_per_token"] + test["kl_per_token"] + test["oov_per_token"], rel=1e-9)
    assert len(test["per_document"]) == test["documents"]


def test_bad_config_name_is_a_clear_error(capsys, caplog):
    assert main(["fit", "--model", "no-such-preset"]) == 2
    assert "no models configuration 'no-such-preset'" in caplog.text


def test_bench_list_names_every_benchmark(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("svi-speed", "suffix-parallel", "chorales", "text-guide", "text-lm"):
        assert name in out


def test_bench_text_is_refused_by_a_benchmark_that_takes_none(tmp_path, caplog):
    text = tmp_path / "a.txt"
    text.write_text("some text")
    assert main(["bench", "svi-speed", "--quick", "--text", str(text)]) == 2
    assert "takes no --text" in caplog.text


@pytest.mark.lm
@pytest.mark.integration
def test_demo_usage_reads_beyond_one_window_writes_and_plots(tmp_path):
    from vmt.experiment import ModelPreset, Schedule, demo_usage, fit_reverse, run_text
    from vmt.inference.train import TrainConfig

    preset = ModelPreset.from_dict({
        "encoder": {"kind": "lm", "layer": 2, "window": 32},
        "vocab_max_size": 300,
        "vmt": {"state_dim": 4, "prior_components": 2, "transition_hidden": 16, "guide_hidden": 16,
                "reverse": True},
    })
    schedule = Schedule(train=TrainConfig(steps=4, batch_size=2, max_length=8, budget=64, log_every=2),
                        max_train_tokens=800, max_test_tokens=200, eval_window=32, eval_particles=2,
                        reverse_steps=3)
    result = run_text(preset, schedule, tmp_path, progress=False)
    shared = {k: v.clone() for k, v in result.model.emission.state_dict().items()}
    reverse_before = {k: v.clone() for k, v in result.model.reverse_transition.state_dict().items()}
    fit_reverse(result, tmp_path, steps=3, progress=False)
    # the reverse parts trained, the shared emission did not
    assert all(torch.equal(v, result.model.emission.state_dict()[k]) for k, v in shared.items())
    assert any(not torch.equal(v, result.model.reverse_transition.state_dict()[k])
               for k, v in reverse_before.items())
    assert (tmp_path / "checkpoint-with-reverse" / "model.safetensors").is_file()
    usage = demo_usage(result, tmp_path, continuation=5)
    assert isinstance(usage.prequel, str)
    assert usage.tokens_read > 32 and usage.windows >= 2  # longer than one window
    assert usage.neg_elbo_per_token > 0 and isinstance(usage.continuation, str)
    assert usage.trajectory_plot.stat().st_size > 0
