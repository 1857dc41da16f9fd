import pytest
import torch

from vmt.data.synthetic_recall import (
    RecallTaskConfig,
    sample_eval_batch,
    sample_training_batch,
    single_query,
    write_answers,
)

CFG = RecallTaskConfig(n_pairs=3, n_keys=5, n_values=4, n_filler=6)


def pairs(tokens):
    """Brute-force reading of the prefix: {key: (value, value position)} per row."""
    out = []
    for row in tokens.tolist():
        out.append({row[2 * i]: (row[2 * i + 1], 2 * i + 1) for i in range(CFG.n_pairs)})
    return out


def test_eval_batch_queries_sit_at_the_requested_distances():
    gen = torch.Generator().manual_seed(0)
    tokens, targets, qpos = sample_eval_batch(CFG, 50, [10, 20, 40], gen)
    assert tokens.shape == (50, 2 * 3 + 40)
    for b, table in enumerate(pairs(tokens)):
        assert len(table) == 3  # distinct keys
        assert all(CFG.key_offset <= k < CFG.value_offset for k in table)
        assert all(v >= CFG.value_offset for v, _ in table.values())
        scored = (targets[b] != -100).nonzero().flatten().tolist()
        assert scored == sorted(qpos[b].tolist())
        for j, d in enumerate([10, 20, 40]):
            p = int(qpos[b, j])
            value, vpos = table[int(tokens[b, p])]
            assert int(targets[b, p]) == value and p - vpos == d
        # everything after the prefix that is not a query is filler
        rest = [t for i, t in enumerate(tokens[b].tolist()) if i >= 6 and i not in scored]
        assert all(t < CFG.n_filler for t in rest)


def test_training_batch_targets_are_the_stored_values():
    gen = torch.Generator().manual_seed(1)
    tokens, targets = sample_training_batch(CFG, 20, 60, 0.3, gen)
    n_scored = 0
    for b, table in enumerate(pairs(tokens)):
        for p in (targets[b] != -100).nonzero().flatten().tolist():
            assert p >= 6
            assert int(targets[b, p]) == table[int(tokens[b, p])][0]
            n_scored += 1
    # 20 rows x 54 slots x 0.3 = 324 expected queries; 5 sigma is about +-84
    assert 240 < n_scored < 410


def test_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="n_keys=2"):
        RecallTaskConfig(n_pairs=3, n_keys=2)
    with pytest.raises(ValueError, match="length"):
        sample_training_batch(CFG, 2, 5, 0.1, gen)
    with pytest.raises(ValueError, match="differ"):
        sample_eval_batch(CFG, 2, [10, 12], gen)
    with pytest.raises(ValueError, match="query_prob"):
        sample_training_batch(CFG, 2, 20, 0.0, gen)


def test_write_answers_puts_each_value_after_its_query():
    gen = torch.Generator().manual_seed(3)
    tokens, targets = sample_training_batch(CFG, 40, 60, 0.3, gen)
    out = write_answers(tokens, targets)
    assert out.shape == tokens.shape and out.dtype == torch.int64
    for b in range(40):
        for t in range(60):
            if t > 0 and int(targets[b, t - 1]) != -100:
                assert int(out[b, t]) == int(targets[b, t - 1])  # the answer
            else:
                assert int(out[b, t]) == int(tokens[b, t])  # unchanged elsewhere
    # a query overwritten by an earlier answer is gone; every remaining query is answered
    for b in range(40):
        row = out[b].tolist()
        for t in range(2 * CFG.n_pairs, 59):
            if CFG.key_offset <= row[t] < CFG.value_offset:
                assert row[t + 1] >= CFG.value_offset


def test_write_answers_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\) and \(4, 6\)"):
        write_answers(torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 6, dtype=torch.long))


def test_single_query_keeps_one_question_at_its_distance():
    gen = torch.Generator().manual_seed(1)
    tokens, targets, qpos = sample_eval_batch(CFG, 20, [10, 20, 40], gen)
    for b in range(20):
        for j in range(3):
            seq = single_query(CFG, tokens[b], qpos[b], j, gen)
            end = int(qpos[b, j])
            assert seq.shape == (end + 1,) and int(seq[-1]) == int(tokens[b, end])
            assert torch.equal(seq[: 2 * CFG.n_pairs], tokens[b, : 2 * CFG.n_pairs])
            body = seq[2 * CFG.n_pairs : -1]
            assert bool((body < CFG.n_filler).all())  # no other query before it
    with pytest.raises(ValueError, match="one of the 3 queries"):
        single_query(CFG, tokens[0], qpos[0], 3, gen)
