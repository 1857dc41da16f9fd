import numpy as np
import pytest
import torch

from vmt.mep import NGramBase, TableBase, UniformBase, WindowedLM
from vmt.testing import tiny_llama


def test_ngram_counts_by_hand():
    seqs = [np.array([0, 1, 0, 1, 1])]
    base = NGramBase(seqs, vocab_size=2, window=1, alpha=0.5)
    # after 0: next is 1 twice -> (0 + .5, 2 + .5) / 3; after 1: (1 + .5, 1 + .5) / 3
    np.testing.assert_allclose(base.table, [[0.5 / 3, 2.5 / 3], [0.5, 0.5]], atol=1e-15)
    lp = base.log_probs(np.array([[1, 0], [0, 1]]))
    np.testing.assert_allclose(np.exp(lp), [[0.5 / 3, 2.5 / 3], [0.5, 0.5]], atol=1e-15)
    np.testing.assert_allclose(np.exp(UniformBase(4).log_probs(np.zeros((2, 3), int))), 0.25)


def test_table_base_bad_inputs():
    with pytest.raises(ValueError, match="sum to 1"):
        TableBase(np.ones((2, 2)))
    base = TableBase(np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="window is 1"):
        base.log_probs(np.zeros((2, 0), int))
    with pytest.raises(ValueError, match="tokens must lie"):
        base.log_probs(np.full((2, 1), 3))
    with pytest.raises(ValueError, match="alpha"):
        NGramBase([np.array([0, 1])], 2, 1, alpha=0.0)


def test_windowed_lm_reads_only_its_window():
    model = tiny_llama(vocab_size=31, hidden_size=16, num_layers=1, seed=1)
    lm = WindowedLM(model, window=4, batch_size=3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 31, size=20)
    positions = np.arange(4, 20)
    got = lm.log_probs_at(tokens, positions)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.as_tensor(tokens[8:12])[None]).logits[0, -1].double(), -1)
    # float32 network, same inputs: identical up to float32 rounding of batched kernels
    np.testing.assert_allclose(got[12 - 4], ref.numpy(), atol=1e-5)
    other = tokens.copy()
    other[:8] = (other[:8] + 1) % 31  # change everything before the window of position 12
    np.testing.assert_allclose(lm.log_probs_at(other, [12])[0], got[8], atol=1e-5)
    ctx = np.stack([tokens[p - 6 : p] for p in positions[2:]])
    np.testing.assert_allclose(lm.log_probs(ctx), got[2:], atol=1e-5)


def test_windowed_lm_candidates_and_plain_module_adapter():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(11, 11))

        def forward(self, tokens):  # (batch, time) -> (batch, time, vocab)
            return self.table[tokens]

    lm = WindowedLM(Bigram(), window=2, batch_size=4)
    tokens = np.random.default_rng(1).integers(0, 11, size=15)
    positions = np.arange(2, 15)
    extra = np.stack([tokens[p - 2 : p] for p in positions])  # the window's own tokens
    extra[0, 0] = -1
    c = lm.candidates(tokens, positions, k=3, extra=extra)
    full = lm.log_probs_at(tokens, positions)
    for r in range(len(positions)):
        valid = c.tokens[r] >= 0
        ids = c.tokens[r][valid]
        assert len(set(ids.tolist())) == len(ids)  # no duplicates
        assert set(np.argsort(-full[r])[:3].tolist()) <= set(ids.tolist())
        np.testing.assert_allclose(c.base_logp[r][valid], full[r][ids], atol=1e-12)
        rest = np.delete(full[r], ids)
        assert c.log_rest[r] == pytest.approx(np.log(np.exp(rest).sum()), abs=1e-10)
        assert c.target_base_logp[r] == pytest.approx(full[r][tokens[positions[r]]], abs=1e-12)
        if c.target[r] >= 0:
            assert c.tokens[r, c.target[r]] == tokens[positions[r]]
        else:
            assert tokens[positions[r]] not in ids
    with pytest.raises(ValueError, match="positions must lie"):
        lm.candidates(tokens, [1], k=3)
    with pytest.raises(ValueError, match="window must be"):
        WindowedLM(Bigram(), window=0)
