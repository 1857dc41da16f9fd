import numpy as np
import pytest

from vmt.mep import (
    MarkovSource,
    enumerate_sequences,
    higher_order_source,
    markov_source,
    pairwise_source,
)


def chain_rule_joint(src: MarkovSource, length: int) -> np.ndarray:
    """Brute force: stationary start block times conditionals, sequence by sequence."""
    seqs = enumerate_sequences(src.vocab_size, length)
    start = src.stationary()
    out = np.empty(len(seqs))
    r = src.order
    for i, s in enumerate(seqs):
        p = start[tuple(s[:r])]
        for t in range(r, length):
            p *= src.cond[tuple(s[t - r : t + 1])]
        out[i] = p
    return out.reshape((src.vocab_size,) * length)


@pytest.mark.parametrize("make", [
    lambda rng: markov_source(3, 2, rng),
    lambda rng: pairwise_source(3, 2, rng)[0],
    lambda rng: higher_order_source(3, 2, rng),
])
def test_blocks_match_brute_force_and_are_stationary(make):
    src = make(np.random.default_rng(0))
    joint = src.block(5)
    # float64 sums of a few hundred terms
    np.testing.assert_allclose(joint, chain_rule_joint(src, 5), atol=1e-14)
    np.testing.assert_allclose(joint.sum(0), src.block(4), atol=1e-14)  # stationarity
    np.testing.assert_allclose(joint.sum(-1), src.block(4), atol=1e-14)
    assert joint.sum() == pytest.approx(1.0, abs=1e-13)


def test_truncation_loss_is_conditional_mutual_information():
    src = higher_order_source(3, 3, np.random.default_rng(1))
    j = src.block(4)  # (far, w1, w2, next) with window 2
    p_fw = j.sum(-1, keepdims=True)
    p_wn = j.sum(0, keepdims=True)
    p_w = j.sum((0, 3), keepdims=True)
    cmi = float((j * np.log(j * p_w / (p_fw * p_wn))).sum())
    assert src.truncation_loss(2) == pytest.approx(cmi, abs=1e-13)
    assert src.truncation_loss(3) == pytest.approx(0.0, abs=1e-15)
    assert src.truncation_loss(5) == pytest.approx(0.0, abs=1e-15)


def test_pairwise_source_is_pairwise_additive():
    src, h, J = pairwise_source(4, 3, np.random.default_rng(2))
    logp = np.log(src.cond)
    a = np.array([1, 3, 0])  # x_{n-3}, x_{n-2}, x_{n-1}
    logits = h + J[2][a[0]] + J[1][a[1]] + J[0][a[2]]
    np.testing.assert_allclose(logp[tuple(a)], logits - np.log(np.exp(logits).sum()), atol=1e-12)


def test_backward_truncated_and_samples():
    src = markov_source(3, 1, np.random.default_rng(3))
    back = src.backward_truncated(1)  # p(x_n | x_{n+1}), layout (x_{n+1}, x_n)
    pair = src.block(2)  # (x_n, x_{n+1})
    np.testing.assert_allclose(back, (pair / pair.sum(0, keepdims=True)).T, atol=1e-14)
    seq = src.sample(4, 5000, np.random.default_rng(4))
    freq = np.bincount(seq.ravel(), minlength=3) / seq.size
    # 20000 correlated draws: standard error ~0.005; 0.03 is a generous bound
    np.testing.assert_allclose(freq, src.block(1), atol=0.03)


def test_log_prob_next_and_bad_inputs():
    src = markov_source(3, 2, np.random.default_rng(5))
    w = np.array([[0, 1, 2, 1]])
    assert src.log_prob_next(w)[0] == pytest.approx(np.log(src.cond[1, 2, 1]))
    with pytest.raises(ValueError, match="windows must be"):
        src.log_prob_next(np.array([[0, 1]]))
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovSource(np.ones((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        MarkovSource(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="too many"):
        enumerate_sequences(10, 8)
