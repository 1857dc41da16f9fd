import math

import pytest
import torch

from vmt.memory import (
    CacheState,
    FullContext,
    KVStream,
    SirLLM,
    StreamingLLM,
    paper_surprisal,
    reference_surprisal,
    window_policy,
)
from vmt.testing import tiny_llama


def _state(scores):
    n = len(scores)
    return CacheState(
        positions=torch.arange(n), tokens=torch.zeros(n, dtype=torch.int64),
        scores=torch.tensor(scores, dtype=torch.float64),
    )


@pytest.mark.parametrize("policy", [StreamingLLM(1000, 4), SirLLM(1000, 4), window_policy(1000)])
def test_cache_larger_than_stream_reproduces_full_attention(policy):
    model = tiny_llama()
    tokens = torch.randint(0, 97, (301,))
    with torch.no_grad():
        full = model(tokens[None]).logits[0]
    out = KVStream(model, policy, chunk_size=37).feed(tokens, return_logits=True)
    # chunked cached attention vs one pass: only float32 summation order differs
    assert (out.logits - full).abs().max() <= 1e-4


def test_streaming_keeps_sinks_and_recent():
    policy = StreamingLLM(budget=10, n_sinks=3)
    keep = policy.select(_state([0.0] * 12), n_incoming=2)
    assert keep.tolist() == [0, 1, 2, 7, 8, 9, 10, 11]
    assert window_policy(5).select(_state([0.0] * 9), 1).tolist() == [5, 6, 7, 8]


def test_sirllm_selection_by_hand():
    #          0    1    2    3    4    5    6    7    8    9
    scores = [9.0, 0.1, 5.0, 0.2, 7.0, 0.3, 5.0, 0.4, 0.5, 6.0]
    policy = SirLLM(budget=8, n_sinks=2, decay=1.0)
    # keep 8 - 3 = 5: sinks {0,1} + top-3 of the rest {4:7, 9:6, and 2 vs 6 tie -> newer 6}
    assert policy.select(_state(scores), n_incoming=3).tolist() == [0, 1, 4, 6, 9]
    with_window = SirLLM(budget=8, n_sinks=1, n_recent=2, decay=1.0)
    # keep 5: sink {0}, recent {8, 9}, top-2 of 1..7 -> {4: 7.0, 6: 5.0 (newer of the 5.0 tie)}
    assert with_window.select(_state(scores), n_incoming=3).tolist() == [0, 4, 6, 8, 9]


def test_surprisal_scores_match_hand_computation():
    model = tiny_llama()
    tokens = torch.randint(0, 97, (40,))
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[None]).logits[0].double(), -1)
    # paper: s_i = -log p(y_i | y_<i), first token undefined -> 0
    want = torch.cat([torch.zeros(1, dtype=torch.float64), -logp[:-1].gather(1, tokens[1:, None])[:, 0]])
    stream = KVStream(model, SirLLM(budget=100, decay=1.0), chunk_size=13)
    stream.feed(tokens)
    # float32 model vs float64 softmax of the same logits: nats of O(5), float32 rounding
    torch.testing.assert_close(stream.state.scores, want, atol=1e-4, rtol=0)

    # reference code: per forward call, raw_j = -log p_j(y_j), shifted right, max in front
    ref = KVStream(model, SirLLM(budget=100, decay=1.0, surprisal="reference"), chunk_size=40)
    ref.feed(tokens)
    raw = -logp.gather(1, tokens[:, None])[:, 0]
    want_ref = torch.cat([raw.max().reshape(1), raw[:-1]])
    torch.testing.assert_close(ref.state.scores, want_ref, atol=1e-4, rtol=0)
    # the pure functions agree with the same hand computation
    torch.testing.assert_close(reference_surprisal(logp.float(), tokens), want_ref, atol=1e-4, rtol=0)
    assert paper_surprisal(torch.tensor([math.nan, -2.0])).tolist() == [0.0, 2.0]


def test_decay_multiplies_every_kept_score_each_round():
    model = tiny_llama()
    stream = KVStream(model, SirLLM(budget=100, decay=0.7))
    stream.feed(torch.randint(0, 97, (10,)))
    first = stream.state.scores.clone()
    stream.end_round()
    stream.end_round()
    stream.feed(torch.randint(0, 97, (5,)))
    new = stream.state.scores[10:].clone()
    stream.end_round()
    # exact float64 products: r^3 for the first block, r for the second
    torch.testing.assert_close(stream.state.scores[:10], first * 0.7**3, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(stream.state.scores[10:], new * 0.7, atol=1e-15, rtol=1e-14)
    # StreamingLLM has no scores to decay: end_round leaves them alone
    s = KVStream(model, StreamingLLM(100))
    s.feed(torch.randint(0, 97, (6,)))
    before = s.state.scores.clone()
    s.end_round()
    assert torch.equal(s.state.scores, before)


@pytest.mark.parametrize(
    "policy",
    [SirLLM(48, n_sinks=4, decay=0.9), SirLLM(40, 2, n_recent=8, decay=0.5, surprisal="reference"),
     StreamingLLM(48, 4), window_policy(32)],
)
def test_budget_never_exceeded_over_2000_rounds(policy):
    model = tiny_llama()
    stream = KVStream(model, policy, chunk_size=16)
    gen = torch.Generator().manual_seed(1)
    options = [torch.tensor([5]), torch.tensor([6]), torch.tensor([7])]
    multi = [torch.tensor([5, 9]), torch.tensor([6, 2, 3])]
    for r in range(2000):
        prompt = torch.randint(2, 97, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        stream.choose(prompt, multi if r % 50 == 0 else options)
        stream.end_round()
        assert stream.cache_length <= policy.budget
        assert stream.cache_length == len(stream.state)
    assert stream.max_cache_length <= policy.budget
    assert stream.n_evictions > 100  # the budget was actually binding
    # sinks are the stream's first tokens and were never evicted
    assert stream.state.positions[: policy.reserved - getattr(policy.config, "n_recent", 0)].tolist() == list(
        range(policy.reserved - getattr(policy.config, "n_recent", 0))
    )


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"budget \(4\) must exceed the sink count \(4\)"):
        StreamingLLM(budget=4, n_sinks=4)
    with pytest.raises(ValueError, match=r"budget \(3\) must exceed sinks"):
        SirLLM(budget=3, n_sinks=4)
    with pytest.raises(ValueError, match=r"budget \(10\) must exceed sinks"):
        SirLLM(budget=10, n_sinks=4, n_recent=6)
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="decay must lie in"):
            SirLLM(budget=64, decay=bad)
    assert SirLLM(budget=64, decay=1.0).config.decay == 1.0
    with pytest.raises(ValueError, match="surprisal must be one of"):
        SirLLM(budget=64, surprisal="entropy")
    with pytest.raises(ValueError, match="budget must be an integer"):
        StreamingLLM(budget=0)
    with pytest.raises(ValueError, match="n_sinks must be"):
        StreamingLLM(budget=10, n_sinks=-1)
    model = tiny_llama(max_positions=64)
    with pytest.raises(ValueError, match="chunk_size"):
        KVStream(model, StreamingLLM(16), chunk_size=0)
    with pytest.raises(ValueError, match="exceeds the model's window of 64"):
        KVStream(model, FullContext()).feed(torch.zeros(65, dtype=torch.int64))


@pytest.mark.lm
def test_smollm2_cache_larger_than_stream_reproduces_full_attention(smollm2):
    model, tok = smollm2
    from vmt.memory.tasks import natural_text_stream

    tokens = torch.tensor(tok(natural_text_stream(600), add_special_tokens=False).input_ids[:96])
    with torch.no_grad():
        full = model(tokens[None]).logits[0]
    for policy in (StreamingLLM(1000, 4), SirLLM(1000, 4, decay=0.9)):
        out = KVStream(model, policy, chunk_size=32).feed(tokens, return_logits=True)
        # acceptance bound: float32 logits of magnitude ~10-30 through 30 layers
        assert (out.logits - full).abs().max() <= 1e-4
