"""Count-based language models: normalisation over the full vocabulary and hand-computed
values on a tiny corpus."""

import math

import numpy as np
import pytest
import torch

from vmt.data.ngram import AddHalfUnigram, KneserNey


def random_corpus(vocab: int, docs: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a skewed source so that some n-grams repeat (counts of 1 and 2 both occur)
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).reciprocal()
    return [torch.multinomial(weights, int(torch.randint(20, 60, (1,), generator=g)), True,
                              generator=g) for _ in range(docs)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_sums_to_one_over_the_vocabulary_for_random_contexts(order):
    vocab = 40
    model = KneserNey(random_corpus(30), vocab, order=order)  # ids 30..39 never seen
    rng = np.random.default_rng(0)
    for _ in range(20):
        context = rng.integers(0, vocab, size=int(rng.integers(0, 4))).tolist()
        p = model.distribution(context)
        assert p.shape == (vocab,) and bool((p > 0).all())
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_kneser_ney_over_the_full_smollm2_vocabulary_sums_to_one():
    vocab = 49_152
    docs = [torch.randint(0, 500, (200,), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    model = KneserNey(docs, vocab, order=3)
    for context in ([], [3], [docs[0][5].item(), docs[0][6].item()], [49_000, 17]):
        assert model.distribution(context).sum() == pytest.approx(1.0, abs=1e-10)
    # token_log_probs agrees with the distribution it is a slice of
    lp = model.token_log_probs(docs[1][:4])
    assert lp[2] == pytest.approx(math.log(model.distribution(docs[1][:2].tolist())[docs[1][2]]))


def test_kneser_ney_bigram_matches_hand_computed_values():
    # corpus 0 1 0 1 2 over 4 ids (3 unseen), discounts 1/2; worked out in full:
    # continuation counts N1+(. w) from bigram types (B,0) (0,1) (1,0) (1,2): 2, 1, 1, 0
    # p1(w) = max(N1+ - 1/2, 0) / 4 + (1/2 * 3 / 4) / 4  ->  15/32, 7/32, 7/32, 3/32
    model = KneserNey([torch.tensor([0, 1, 0, 1, 2])], 4, order=2, discounts=(0.5, 0.5))
    assert model.distribution([3]) == pytest.approx([15 / 32, 7 / 32, 7 / 32, 3 / 32], abs=1e-15)
    # after 0: c(0 1) = 2 of c(0 .) = 2, one type: 3/4 + 1/4 * p1
    expected = [0.25 * 15 / 32, 0.75 + 0.25 * 7 / 32, 0.25 * 7 / 32, 0.25 * 3 / 32]
    assert model.distribution([0]) == pytest.approx(expected, abs=1e-15)
    # score 0 1 3: p(0 | B) = 1/2 + 1/2 * 15/32, p(1 | 0), p(3 | 1) = 1/2 * 3/32
    lp = model.token_log_probs(torch.tensor([0, 1, 3]))
    want = np.log([0.5 + 0.5 * 15 / 32, 0.75 + 0.25 * 7 / 32, 0.5 * 3 / 32])
    assert lp == pytest.approx(want, abs=1e-14)


def test_default_discounts_come_from_counts_of_counts():
    docs = random_corpus(20)
    model = KneserNey(docs, 20, order=2)
    keys = {}
    for d in docs:
        padded = [20] + d.tolist()
        for a, b in zip(padded, padded[1:], strict=False):
            keys[(a, b)] = keys.get((a, b), 0) + 1
    n1 = sum(1 for c in keys.values() if c == 1)
    n2 = sum(1 for c in keys.values() if c == 2)
    assert model.discounts[1] == pytest.approx(n1 / (n1 + 2 * n2))


def test_trigram_beats_unigram_on_a_repetitive_source_and_unigram_is_add_half():
    uni = AddHalfUnigram([torch.tensor([0, 1, 0, 1, 2])], 4)
    assert np.exp(uni.log_probs) == pytest.approx(np.array([2.5, 2.5, 1.5, 0.5]) / 7, abs=1e-15)
    docs = [torch.tensor([0, 1, 2, 3] * 10) for _ in range(3)]
    tri = KneserNey(docs, 10, order=3)
    test = torch.tensor([0, 1, 2, 3] * 5)
    assert tri.token_log_probs(test)[2:].mean() > math.log(0.9)
    assert AddHalfUnigram(docs, 10).token_log_probs(test).mean() < math.log(0.3)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="outside"):
        KneserNey([torch.tensor([0, 7])], 5)
    with pytest.raises(ValueError, match="discounts"):
        KneserNey([torch.tensor([0, 1])], 5, order=2, discounts=(0.5,))
    with pytest.raises(ValueError, match="order"):
        KneserNey([torch.tensor([0, 1])], 5, order=0)
