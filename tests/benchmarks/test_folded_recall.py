"""The folded-recall benchmark's VMT row at tiny sizes, the carried-memory sizes and the
interval it reports."""

import math

import pytest

from vmt.benchmarks import folded_recall
from vmt.benchmarks.report import wilson_interval


@pytest.mark.integration
def test_the_vmt_row_trains_on_answered_sequences_and_scores_every_distance():
    acc, record = folded_recall.train_and_evaluate_vmt(seed=0, steps=3, batch=4, max_length=40, n_eval=2)
    assert sorted(acc) == folded_recall.DISTANCES
    assert all(v in (0.0, 0.5, 1.0) for v in acc.values())  # two queries per distance
    assert record["steps"] >= 3 * 18 * 4 // (4 * folded_recall.VMT_WINDOW)  # one pass, every token read
    assert math.isfinite(record["neg_elbo_per_token"]) and record["cpu_seconds"] > 0


def test_carried_bytes_of_every_row():
    sizes = {kind: folded_recall.carried_bytes(kind) for kind in folded_recall.ROWS}
    assert sizes["vmt"] == folded_recall.VMT_SAMPLES * (folded_recall.VMT_MEMORY + folded_recall.VMT_TOKEN) * 4
    assert all(v > 0 for v in sizes.values())


@pytest.mark.parametrize("k, n, lo, hi", [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),
                                          (384, 1536, 0.2290, 0.2723)])
def test_wilson_interval_against_worked_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="11 of 10"):
        wilson_interval(11, 10)
