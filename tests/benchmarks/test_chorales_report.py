"""The chorales page's budgeted-run notes, from made-up run records (no training)."""

import math

import pytest

from vmt.benchmarks.chorales import _budget_figure, _limits


def _run(seed: int, stopped: str, best_step: int, valid: list[float], train: list[float]) -> dict:
    curve = [{"step": 1000 * (i + 1), "cpu_seconds": 60.0 * (i + 1), "valid_neg_elbo": v, "train_neg_elbo": t}
             for i, (v, t) in enumerate(zip(valid, train, strict=True))]
    return {"seed": seed, "stopped": stopped, "best_step": best_step, "curve": curve,
            "cpu_seconds": curve[-1]["cpu_seconds"], "valid": {"neg_elbo": min(valid)},
            "test": {"neg_elbo": 7.5 + seed, "iwae": 7.3 + seed}, "iwae": {"iwae": 7.1 + seed}}


def test_limits_reports_the_best_step_the_overfitting_gap_and_the_guide_gap():
    runs = {"JSB": [_run(0, "patience", 2000, [9.0, 8.0, 8.2, 8.4], [9.5, 7.0, 6.5, 6.0]),
                    _run(1, "cpu budget", 4000, [9.0, 8.5, 8.2, 8.1], [9.5, 7.5, 7.0, math.nan])]}
    (text,) = _limits(runs, 1000)
    assert "best validation bound came at 180 of the 240 CPU s" in text  # (120 + 240) / 2
    assert "1 of 2 run(s) stopped because" in text
    assert "+2.40 nats above the training" in text  # the finite gap only: 8.4 - 6.0
    assert "leaves 0.40 nats per step between the test −ELBO and IWAE-1000" in text
    assert _limits({"JSB": [dict(runs["JSB"][0], test=None)]}, 1000) == []


@pytest.mark.parametrize("stopped, extrapolated", [("patience", False), ("cpu budget", True)])
def test_runs_stopped_on_validation_are_not_extrapolated(tmp_path, stopped, extrapolated):
    valid = [10.0, 9.0, 8.5, 8.2, 8.0, 7.9, 7.85, 7.8]
    runs = {"JSB": [_run(s, stopped, 8000, [v + 0.01 * s for v in valid], valid) for s in (0, 1)]}
    figure, fit = _budget_figure(runs, quick=False, figure_dir=tmp_path)
    assert figure.is_file()
    assert (fit is not None) == extrapolated


def test_guide_comparison_pairs_the_pieces_of_both_guides(monkeypatch, tmp_path):
    """Two made-up runs whose per-piece bounds differ by exactly 0.5 nats per step on every
    piece: the paired difference and its interval are exactly +0.500."""
    from vmt.benchmarks import chorales

    def fake_run(preset, schedule, splits, label, seed, root, data_name, reuse_only=False):
        shift = 0.5 if preset.vmt["guide"] == "affine" else 0.0
        steps = [10, 20, 30, 40]
        pieces = [[t, t * (7.0 + shift + 0.1 * i), t * (6.8 + shift + 0.1 * i)] for i, t in enumerate(steps)]
        return {"steps": 100, "cpu_seconds": 50.0, "valid": {"neg_elbo": 7.5 + shift},
                "test": {"neg_elbo": 0.0, "per_piece": pieces}}

    monkeypatch.setattr(chorales, "_run_seed", fake_run)
    md, metrics, config = chorales.guide_comparison(None, quick=True, root=tmp_path)
    assert config["guides"] == ["gaussian", "affine"]
    assert metrics["jsb_guide_affine_test_neg_elbo"] - metrics["jsb_guide_gaussian_test_neg_elbo"] == pytest.approx(0.5)
    assert md.count("+0.500 [+0.500, +0.500]") == 2  # the -ELBO and the IWAE columns
