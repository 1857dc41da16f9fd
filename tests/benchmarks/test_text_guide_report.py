"""``vmt bench text-guide``'s scan-against-gated table, from made-up runs (no training)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vmt.benchmarks import text_guide
from vmt.benchmarks.text_lm import Row

TOKENS = np.array([120.0, 300.0, 80.0, 500.0, 210.0, 95.0])


def _runs(shift: np.ndarray | float, steps=(500, 900)) -> dict:
    """Per-document bounds of two guides: the gated guide's IWAE is 6 nats per token plus some
    spread over documents; the affine guide's is ``shift`` nats per token more (per document)."""
    spread = np.array([0.4, -0.2, 0.9, -0.1, 0.3, -0.6])
    runs = {}
    for (guide, label), n, delta in zip(text_guide.GUIDES, steps, (0.0, shift), strict=True):
        iwae = TOKENS * (6.0 + spread + delta)
        extra = {"kl": 2.0, "explained_dims": 60, "state_dim": 64, "steps": n, "cpu_seconds": 300.0,
                 "stopped": "cpu budget"}
        runs[guide] = (Row(label, f"{guide}_iwae", iwae, TOKENS, "", extra),
                       Row(label, f"{guide}_neg_elbo", iwae + 0.5 * TOKENS, TOKENS, "", extra))
    return runs


def _summary(runs, tmp_path, default="gaussian"):
    schedule = text_guide._guide_setup(True, 3000, 800, 8)[1]  # the demo schedule: 400 steps
    curves = {g: [{"step": 400, "cpu_seconds": 95.2, "elbo_per_token": -7.0}] for g, _ in text_guide.GUIDES}
    return text_guide.guide_summary(runs, curves, schedule, 300.0, default, tmp_path)


def test_a_scan_guide_better_on_every_document_becomes_the_default(tmp_path):
    md, metrics, config, figure = _summary(_runs(-0.25), tmp_path)
    assert figure.is_file() and config["guides"] == ["gaussian", "affine"]
    assert md.count("-0.250 [-0.250, -0.250]") == 2  # the IWAE and the -ELBO columns
    assert "the scan guide is ahead of the gated guide by 0.250 nats per token" in md
    assert "which excludes 0" in md and "becomes the default of the preset" in md
    assert "stays gated" not in md
    assert metrics["scan_guide_affine_minus_gated_iwae8"] == pytest.approx(-0.25)
    assert metrics["scan_guide_at_least_as_good"] == 1.0
    assert metrics["scan_guide_affine_steps_per_cpu_second"] == pytest.approx(3.0)
    assert "| 900 | 3 | 300 |" in md  # steps, steps per CPU s, CPU s
    assert "300 CPU seconds of SVI on one thread" in md
    assert "; the schedule's own 400 steps took the gated guide 95 CPU s)" in md


def test_a_worse_scan_guide_leaves_the_default_gated(tmp_path):
    md, metrics, _, _ = _summary(_runs(0.5), tmp_path)
    assert "+0.500 [+0.500, +0.500]" in md
    assert "the gated guide is ahead of the scan guide by 0.500" in md and "which excludes 0" in md
    assert "the default stays gated" in md and metrics["scan_guide_at_least_as_good"] == 0.0


def test_an_interval_across_zero_decides_by_the_point_difference(tmp_path):
    shift = np.array([0.3, -0.3, 0.3, -0.3, 0.3, -0.3])  # mixed over documents
    md, metrics, _, _ = _summary(_runs(shift), tmp_path)
    d = metrics["scan_guide_affine_minus_gated_iwae8"]
    assert metrics["scan_guide_affine_minus_gated_iwae8_ci_low"] < 0 < metrics["scan_guide_affine_minus_gated_iwae8_ci_high"]
    assert "which includes 0: the held-out documents do not separate the two" in md
    assert d == pytest.approx(0.3 * (120 - 300 + 80 - 500 + 210 - 95) / TOKENS.sum())  # < 0
    assert "becomes the default" in md and metrics["scan_guide_at_least_as_good"] == 1.0


def test_the_rule_for_a_new_default():
    assert text_guide.at_least_as_good(0.0, -0.1)
    assert text_guide.at_least_as_good(-0.2, -0.3)
    assert not text_guide.at_least_as_good(0.01, -0.1)  # behind on the point
    assert not text_guide.at_least_as_good(-0.0, 0.02)  # an interval wholly above 0


def test_both_guides_train_for_the_same_cpu_budget_on_one_thread(monkeypatch):
    """A fake ``run_text``: both guides get the same CPU budget, a step limit far beyond it and
    one thread; the threads are restored afterwards."""
    from vmt import experiment

    seen = []

    def fake_run_text(preset, schedule, out, resume=True, progress=True):
        seen.append((preset.vmt["guide"], schedule.train, torch.get_num_threads()))
        docs = [SimpleNamespace(index=i, tokens=int(t), neg_iwae=6.0 * t, neg_elbo=6.5 * t)
                for i, t in reversed(list(enumerate(TOKENS)))]
        test = SimpleNamespace(per_document=docs, iwae_per_token=6.0, neg_elbo_per_token=6.5, kl_per_token=2.0,
                               explained_dims=60)
        train = SimpleNamespace(steps=400, cpu_seconds=schedule.train.max_cpu_seconds, stopped="cpu budget",
                                history=[])
        return SimpleNamespace(test=test, train=train, model=SimpleNamespace(config=SimpleNamespace(state_dim=64)))

    monkeypatch.setattr(experiment, "run_text", fake_run_text)
    monkeypatch.setenv("VMT_TEXT_GUIDE_SECONDS", "123")
    threads = torch.get_num_threads()
    runs, _, schedule, seconds, default = text_guide.guide_comparison(False, 3000, 800, 2)
    assert seconds == 123.0 and default == "gaussian" and torch.get_num_threads() == threads
    assert [g for g, _, _ in seen] == ["gaussian", "affine"]
    for _, train, n in seen:
        assert train.max_cpu_seconds == 123.0 and train.steps >= 100 * 400 and n == 1
    iwae, neg_elbo = runs["affine"]
    assert iwae.nll.tolist() == (6.0 * TOKENS).tolist()  # documents back in index order
    assert neg_elbo.per_token == pytest.approx(6.5)
    assert schedule.eval_particles == 2
