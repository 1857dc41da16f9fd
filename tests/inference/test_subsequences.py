import pytest
import torch

from vmt.inference.subsequences import (
    Curriculum,
    SubsequenceSampler,
    suffix_parallel_batch,
    suffix_rows,
)
from vmt.models import ChainBatch


def test_suffixes_are_chosen_longest_first_within_budget():
    source, start, end = suffix_rows(torch.tensor([5, 3]), budget=12, min_length=2)
    chosen = sorted(zip(source.tolist(), start.tolist(), end.tolist()))
    # candidates by length: (5:b0j0) (4:b0j1) (3:b0j2) (3:b1j0) (2:...) -> 5 + 4 + 3 = 12
    assert chosen == [(0, 0, 5), (0, 1, 5), (0, 2, 5)]
    assert int((end - start).sum()) <= 12


def test_budget_smaller_than_one_subsequence_is_an_error():
    with pytest.raises(ValueError, match="budget of 3 states is smaller than one subsequence"):
        suffix_rows(torch.tensor([5]), budget=3)


def test_suffix_batch_shares_features_through_source():
    base = ChainBatch(obs=torch.arange(6).view(1, 6), start=torch.tensor([0]), end=torch.tensor([6]),
                      features=torch.randn(1, 6, 3))
    sb = suffix_parallel_batch(base, budget=100)
    assert sb.num_rows == 5 and sb.features is base.features
    assert sb.start.tolist() == [0, 1, 2, 3, 4] and sb.end.tolist() == [6] * 5


def test_curriculum_and_sampler():
    cur = Curriculum(2, 5, 3)
    assert [cur.length_at(s) for s in range(0, 15, 3)] == [2, 3, 4, 5, 5]
    docs = [torch.arange(10), torch.arange(3)]
    sampler = SubsequenceSampler(docs, generator=torch.Generator().manual_seed(1))
    batch = sampler.sample(8, 4)
    assert batch.obs.shape == (8, 4)
    assert set(batch.end.tolist()) <= {3, 4}
    # every row is a contiguous run of one of the documents
    for row, n in zip(batch.obs, batch.end):
        r = row[: int(n)]
        assert bool((r[1:] - r[:-1] == 1).all())
