"""Reading with a bounded window: exact ELBO accounting, bounded memory, skip and jump."""

import tracemalloc

import pytest
import torch

from vmt.inference.reading import ReadConfig, continuation_cost, flipped, read
from vmt.models import ChainBatch
from vmt.models.chain import ChainPrior, GuideChain, SequenceEmission

VOCAB = 11


SIZES = dict(vocab=VOCAB, state_dim=4, width=6, hidden=8, embed_dim=5, max_skip=8)  # small_vmt's sizes


class Recording:
    """A feature function that records the longest window it was asked to encode."""

    def __init__(self, fn):
        self.fn, self.longest, self.calls = fn, 0, 0

    def __call__(self, inputs, lengths):
        self.longest = max(self.longest, inputs.shape[1])
        self.calls += 1
        return self.fn(inputs, lengths)


def test_single_window_read_matches_the_core_chain_scores(float64, small_vmt):
    vmt = small_vmt(**SIZES)
    tokens = torch.randint(0, VOCAB, (9,))
    res = read(vmt, tokens, ReadConfig(window=16, keep_path=True), samples=5)
    assert res.windows == 1 and res.scored == 9 and res.position == 8
    # Re-score the sampled paths with the core's vectorised chain distributions (float64):
    # the running sums of the sequential reader must equal them to rounding error.
    rows = 5
    batch = ChainBatch(obs=tokens.expand(rows, -1), start=torch.zeros(rows, dtype=torch.long),
                       end=torch.full((rows,), 9), reader_input=tokens.expand(rows, -1),
                       reader_lengths=torch.full((rows,), 9))
    with torch.no_grad():
        ctx = vmt.guide_context(batch)
        x = res.path
        guide = GuideChain(vmt.guide_net, ctx, batch).log_prob(x)
        latent = ChainPrior(vmt.prior, vmt.transition, batch, 4).log_prob(x)
        lik = SequenceEmission(vmt.emission, x, batch).log_prob(batch.obs)
    torch.testing.assert_close(res.log_guide, guide, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.log_latent, latent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.log_lik, lik, rtol=1e-10, atol=1e-10)
    assert res.state.shape == (5, 4)
    torch.testing.assert_close(res.state, x[:, -1])


def test_windows_advance_by_half_and_never_exceed_w(float64, small_vmt):
    vmt = small_vmt(**SIZES)
    fn = Recording(vmt.reader)
    tokens = torch.randint(0, VOCAB, (50,))
    res = read(vmt, tokens, ReadConfig(window=8, keep_path=True, encode_windows=1), fn, samples=2)
    # windows start at 0, 4, ..., 40; the window at 40 reaches the end (48 >= 50 is false,
    # so 44 is the last start: 44 + 8 >= 50)
    assert fn.longest == 8
    assert res.windows == fn.calls == 12
    # four windows per call: 11 full windows in runs of 4, 4, 3, then the short last one
    fn = Recording(vmt.reader)
    assert read(vmt, tokens, ReadConfig(window=8, encode_windows=4), fn).windows == 12
    assert fn.calls == 4 and fn.longest == 8
    assert res.scored == 50 and res.position == 49
    assert bool(torch.isfinite(res.path).all())
    assert torch.isfinite(res.elbo).all()


def test_carried_state_continues_exactly(float64, small_vmt):
    """Reading [a, b] in one go equals reading a, then b from the carried state, when the
    windows line up (the guide sees the same contexts)."""
    vmt = small_vmt(**SIZES)
    tokens = torch.randint(0, VOCAB, (12,))
    torch.manual_seed(3)
    whole = read(vmt, tokens, ReadConfig(window=12, keep_path=True))
    assert whole.windows == 1
    # the first read sees only tokens[:5] (less look-ahead), so its states differ; but given a
    # carried x0, the continuation's terms are a pure function of x0 and the tail.
    tail = read(vmt, tokens[5:], ReadConfig(window=12), x0=whole.path[:, 4], samples=1)
    assert tail.scored == 7 and tail.position == 6


def test_reading_memory_does_not_grow_with_input_length(small_vmt):
    vmt = small_vmt(**SIZES)
    config = ReadConfig(window=16)

    tokens = torch.randint(0, VOCAB, (5000,))
    read(vmt, tokens, config)  # warm every cache torch and Pyro keep

    def peak(n):
        tracemalloc.start()
        read(vmt, tokens[:n], config)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(200), peak(5000)
    # 25 times the input adds no per-token storage. Keeping one state tensor per token would
    # add >= 4800 * 80 bytes (the Python tensor objects alone) = 384 kB, a Python float per
    # token 154 kB; torch's internal caches vary by up to ~30 kB between calls (measured), so
    # 100 kB separates the two with a wide margin on both sides.
    assert large - small < 100_000, (small, large)


@pytest.mark.parametrize("skip", [2, 4])
def test_skip_read_samples_every_t_and_ends_at_the_last_token(skip, float64, small_vmt):
    vmt = small_vmt(**SIZES)
    tokens = torch.randint(0, VOCAB, (23,))
    res = read(vmt, tokens, ReadConfig(window=8, skip=skip, keep_path=True), samples=3)
    visited = torch.isfinite(res.path[0, :, 0]).nonzero().flatten().tolist()
    expected = list(range(0, 23, skip))
    if expected[-1] != 22:
        expected.append(22)
    assert visited == expected
    assert res.position == 22
    assert res.skipped_to == sum(1 for a, b in zip(expected, expected[1:], strict=False) if b - a > 1)
    with pytest.raises(ValueError, match="skip read has no ELBO"):
        res.neg_elbo_per_token()
    cost = continuation_cost(vmt, res, torch.randint(0, VOCAB, (6,)), window=8)
    assert cost > 0


def test_jump_draws_the_first_window_end_from_the_reverse_guide(float64, small_vmt):
    vmt = small_vmt(**SIZES, reverse=True)
    tokens = torch.randint(0, VOCAB, (20,))
    res = read(vmt, tokens, ReadConfig(window=8, jump=True, keep_path=True), samples=4000)
    visited = torch.isfinite(res.path[0, :, 0]).nonzero().flatten().tolist()
    assert visited == [7] + list(range(8, 20))
    assert res.scored == 12
    # The jumped state's distribution is q_r(x_8 | h_8): the reverse guide's first-state
    # Gaussian on the forward reading of the first window, scored at position 0 of the
    # reversed window with 8 tokens ahead.
    with torch.no_grad():
        fwd = flipped(vmt.reader)(tokens[:8][None], torch.tensor([8]))
        ctx = vmt.reverse_guide_net.context(fwd[:, 7:8], torch.tensor([[8]]))
        loc, scale, _ = vmt.reverse_guide_net.first_params(ctx[0, 0])
    x = res.path[:, 7]
    # 4000 draws: the sample mean is within 4 standard errors of loc, the sd within 10%.
    assert bool(((x.mean(0) - loc).abs() < 4 * scale / 4000**0.5).all())
    assert bool(((x.std(0) / scale - 1).abs() < 0.1).all())


def test_bad_input_is_rejected_with_clear_errors(float64, small_vmt):
    vmt = small_vmt(**SIZES)
    with pytest.raises(ValueError, match="empty input"):
        read(vmt, torch.zeros(0, dtype=torch.long))
    for w in (0, 1):
        with pytest.raises(ValueError, match="window must be an integer >= 2"):
            ReadConfig(window=w)
    with pytest.raises(ValueError, match="skip"):
        ReadConfig(window=8, skip=5)
    with pytest.raises(ValueError, match="no reverse parts"):
        read(vmt, torch.zeros(5, dtype=torch.long), ReadConfig(window=4, jump=True))
    with pytest.raises(ValueError, match="no reverse parts"):
        read(vmt, torch.zeros(5, dtype=torch.long), direction="reverse")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
        read(vmt, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="x0 must be"):
        read(vmt, torch.tensor([3, 1]), x0=torch.zeros(2, 3))


def test_feature_tokens_reach_the_reader_and_tokens_the_emission(float64, small_vmt):
    vmt = small_vmt(**SIZES)
    tokens = torch.randint(0, VOCAB, (20,))
    shown = (tokens + 1) % VOCAB
    seen = []

    def fn(inputs, lengths):
        seen.extend(row.clone() for row in inputs)
        return vmt.reader(inputs, lengths)

    res = read(vmt, tokens, ReadConfig(window=8, keep_path=True), fn, samples=3,
               feature_tokens=shown)
    # windows start every 4 tokens; each shows the reader the feature tokens, not the tokens
    assert [w.tolist() for w in seen] == [shown[p : p + 8].tolist() for p in range(0, 13, 4)]
    # ... while the emission scores ``tokens`` along the sampled path (float64 sums: 1e-10)
    with torch.no_grad():
        lik = vmt.emission.log_prob(res.path, tokens.expand(3, -1)).sum(-1)
    torch.testing.assert_close(res.log_lik, lik, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="feature_tokens"):
        read(vmt, tokens, ReadConfig(window=8), fn, feature_tokens=shown[:5])
