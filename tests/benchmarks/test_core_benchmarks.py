"""The svi-speed and suffix-parallel benchmarks at tiny sizes: metric names, finiteness, and
the agreement checks they run alongside the timings."""

import math

import pytest
import torch

from vmt.benchmarks import suffix_parallel, svi_speed
from vmt.inference.subsequences import one_row_per_suffix, suffix_parallel_batch, suffix_rows

pytestmark = pytest.mark.integration

TINY_SVI = svi_speed.SviSpeedSetup(batch=3, state_dim=4, vocab=20, feature_dim=6)
TINY_SUFFIX = suffix_parallel.SuffixSetup(bases=2, budget_per_step=4, state_dim=4, vocab=20,
                                          feature_dim=6)


def test_svi_speed_measures_ratios_and_equal_losses(tmp_path):
    threads = torch.get_num_threads()
    results = svi_speed.measure([8], 1, TINY_SVI)
    assert torch.get_num_threads() == threads  # the measurement restores the thread count
    metrics = svi_speed.metrics_of(results)
    for name in ("speedup_L8", "speedup_stepwise_L8", "speedup_scan_L8", "guide_loop_share_L8",
                 "lean_loop_share_L8", "scan_share_L8", "speedup_bound_guide_loop_only_L8",
                 "max_rel_loss_diff_L8", "max_rel_grad_diff_L8", "scan_rel_loss_diff_L8",
                 "scan_rel_grad_diff_L8", "max_rel_loss_diff"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["speedup_L8"] > 0 and metrics["guide_loop_share_L8"] > 0
    # float64, identical draws (or the same path): only summation order differs (observed ~1e-15)
    assert metrics["max_rel_loss_diff_L8"] < 1e-10
    assert metrics["max_rel_grad_diff_L8"] < 1e-8
    assert metrics["scan_rel_loss_diff_L8"] < 1e-10
    assert metrics["scan_rel_grad_diff_L8"] < 1e-8
    figure = svi_speed.plot(results, tmp_path / "svi.png")
    assert figure.stat().st_size > 0
    assert "figures/svi.png" in svi_speed._markdown(results, TINY_SVI, "figures/svi.png")


def test_svi_speed_losses_differ_on_different_draws():
    """The agreement check is not vacuous: other draws give another loss."""
    vmt, batch = svi_speed.build(TINY_SVI, 8)
    torch.manual_seed(1)
    fast = svi_speed.fast_loss(vmt, batch)
    torch.manual_seed(2)
    ref = svi_speed.reference_loss(vmt, batch)
    # a single-sample ELBO of 24 tokens varies by far more than 1e-3 relative between draws
    assert float(((fast - ref).abs() / ref.abs()).detach()) > 1e-3


def test_suffix_parallel_measures_the_same_subsequences_both_ways(tmp_path):
    results = suffix_parallel.measure([8], 1, TINY_SUFFIX)
    r = results[8]
    vmt, base = suffix_parallel.build(TINY_SUFFIX, 8)
    source, start, end = suffix_rows(base.end, 4 * 8)
    assert r.budget == 32 and r.subsequences == len(source) and r.states == int((end - start).sum())
    metrics = suffix_parallel.metrics_of(results)
    for name in ("speedup_L8", "subsequences_L8", "budget_states_L8", "scored_states_L8",
                 "speedup_per_subsequence_L8", "scoring_share_L8",
                 "max_abs_score_diff_L8", "elbo_mean_diff_z_L8", "elbo_mean_rel_diff_L8",
                 "max_abs_score_diff"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["speedup_L8"] > 0
    # float64 scores of a ~8-step path (tens of nats): rounding only
    assert metrics["max_abs_score_diff_L8"] < 1e-9
    # 2 draws x ~12 subsequences per way; same distribution gives |z| of order 1
    assert abs(metrics["elbo_mean_diff_z_L8"]) < 5
    figure = suffix_parallel.plot(results, tmp_path / "suffix.png")
    assert figure.stat().st_size > 0


def test_fixed_path_score_sees_a_misaligned_slice():
    """The score comparison is not vacuous: a slice shifted by one step scores differently."""
    vmt, base = suffix_parallel.build(TINY_SUFFIX, 8)
    parallel = suffix_parallel_batch(base, 32)
    singles = one_row_per_suffix(base, 32)
    x = torch.randn(parallel.num_rows, 8, 4)
    with torch.no_grad():
        shifted = suffix_parallel.elbo_integrand(vmt, parallel, x)
        r = next(i for i in range(parallel.num_rows) if int(parallel.start[i]) > 0)
        a, e = int(parallel.start[r]), int(parallel.end[r])
        aligned = suffix_parallel.elbo_integrand(vmt, singles[r], x[r : r + 1, a:e])
        wrong = suffix_parallel.elbo_integrand(vmt, singles[r], x[r : r + 1, a - 1 : e - 1])
    # float32 scores of tens of nats agree to ~1e-5; a misaligned path differs by nats
    assert torch.allclose(shifted[r], aligned[0], atol=1e-3)
    assert float((shifted[r] - wrong[0]).abs()) > 1e-2
