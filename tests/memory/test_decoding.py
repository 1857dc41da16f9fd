import pytest
import torch

from vmt.memory import KVStream, SirLLM, StreamingLLM, streaming_nll
from vmt.memory.methods import KVMethod, bootstrap_mean_ci, passkey_result
from vmt.memory.tasks import PasskeyTrial
from vmt.testing import tiny_llama


def _full_logp(model, tokens):
    with torch.no_grad():
        return torch.log_softmax(model(tokens[None]).logits[0].double(), -1)


@pytest.mark.parametrize("options", [[[5, 9], [6, 2, 3], [7]], [[5], [6], [7]]])
def test_choose_scores_options_and_keeps_only_the_chosen(options):
    model = tiny_llama()
    prompt = torch.randint(2, 97, (20,))
    opts = [torch.tensor(o) for o in options]
    stream = KVStream(model, SirLLM(budget=500, decay=1.0))
    choice = stream.choose(prompt, opts)
    # oracle: full forwards of prompt + option, float64 log-softmax
    want = []
    for o in opts:
        seq = torch.cat([prompt, o])
        lp = _full_logp(model, seq)
        want.append(float(lp[prompt.numel() - 1 : -1].gather(1, o[:, None]).sum()))
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(choice.logliks, want, atol=1e-4, rtol=0)  # float32 model
    assert choice.index == int(torch.argmax(want))
    nxt = torch.tensor([11, 12])
    got = stream.feed(nxt, return_logits=True).logits
    chosen = torch.cat([prompt, opts[choice.index], nxt])
    with torch.no_grad():
        ref = model(chosen[None]).logits[0, -2:]
    assert (got - ref).abs().max() <= 1e-4  # the history holds exactly the chosen option
    assert stream.state.tokens.tolist() == chosen.tolist()


def test_fork_is_independent_and_generate_is_greedy():
    model = tiny_llama()
    stream = KVStream(model, StreamingLLM(budget=30, n_sinks=2), chunk_size=8)
    stream.feed(torch.randint(2, 97, (50,)))
    copy = stream.fork()
    copy.feed(torch.randint(2, 97, (10,)))
    assert stream.n_seen == 50 and copy.n_seen == 60
    a = stream.fork().generate(5)
    b = stream.fork().generate(5)
    assert torch.equal(a, b) and a.numel() == 5
    # greedy: each generated token is the argmax given the streamed context
    s = stream.fork()
    for t in a.tolist():
        assert int(s.next_logprobs.argmax()) == t
        s.feed(torch.tensor([t]))


def test_streaming_nll_full_context_matches_one_pass():
    model = tiny_llama()
    tokens = torch.randint(0, 97, (120,))
    lp = _full_logp(model, tokens)
    want = -lp[:-1].gather(1, tokens[1:, None])[:, 0]
    got = streaming_nll(model, tokens, None, chunk_size=7)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # float32 model
    with pytest.raises(ValueError, match="at least 2 tokens"):
        streaming_nll(model, tokens[:1])


def test_passkey_greedy_match_against_full_forward():
    model = tiny_llama()
    context = torch.randint(2, 97, (40,))
    lp = _full_logp(model, context)
    greedy = [int(lp[-1].argmax())]
    seq = torch.cat([context, torch.tensor(greedy)])
    greedy.append(int(_full_logp(model, seq)[-1].argmax()))
    method = KVMethod("full", model, SirLLM(budget=200, decay=1.0))
    trial = PasskeyTrial(tuple(context.tolist()), tuple(greedy), "x", 0.5, 0)
    ok, loglik = passkey_result(method, trial)
    assert ok and loglik < 0
    wrong = PasskeyTrial(tuple(context.tolist()), (greedy[0], (greedy[1] + 1) % 97), "x", 0.5, 0)
    assert not passkey_result(method, wrong)[0]


def test_bootstrap_interval_contains_mean_and_shrinks():
    rng = torch.Generator().manual_seed(0)
    x = (torch.rand(400, generator=rng) < 0.3).double().numpy()
    m, lo, hi = bootstrap_mean_ci(x)
    assert lo < m < hi
    # binomial standard error sqrt(.21/400) ~ 0.023: the 95% interval is ~ +-0.045
    assert 0.06 < hi - lo < 0.12
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
