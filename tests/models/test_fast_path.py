"""The vectorised chain sites equal a plain per-step ``pyro.markov`` model on the same draws.

Both guides draw their standard-normal noise in the same order (one ``(batch, state)`` draw
per time step), so with the same seed they produce the same path. Everything runs in float64;
rtol 1e-6 is the acceptance bound and the observed agreement is ~1e-12 (only summation order
differs).
"""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from vmt.inference.elbo import elbo_terms
from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig
from vmt.models.reference import reference_guide, reference_model, reference_path

CASES = {
    "categorical-gated": dict(emission="categorical", obs_dim=11, transition="gated"),
    "categorical-mlp-emission": dict(emission="categorical", obs_dim=11, emission_hidden=8),
    "bernoulli-flows": dict(emission="bernoulli", obs_dim=5, prior="flow", transition="flow", guide="flow"),
    "gaussian-linear": dict(emission="gaussian", obs_dim=3, transition="linear"),
    "gaussian-full-guide": dict(emission="gaussian", obs_dim=3, guide="full"),
}


def make(case, carried=False, rows=3, steps=7):
    """A VMT of ``case`` and a batch for it, in the default dtype (the tests ask for ``float64``)."""
    config = VMTConfig(state_dim=4, feature_dim=6, guide_hidden=8, transition_hidden=8,
                       prior_components=3, max_window=16, **CASES[case])
    vmt = VariationalMarkovTransformer(config)
    if config.guide == "full":  # off-diagonal factors start at zero: make them matter
        torch.nn.init.normal_(vmt.guide_net.tril_head.weight, std=0.5)
        torch.nn.init.normal_(vmt.guide_net.tril_head.bias, std=0.5)
    end = torch.tensor([steps, steps - 2, 3])[:rows]
    if config.emission == "categorical":
        obs = torch.randint(0, config.obs_dim, (rows, steps))
    elif config.emission == "bernoulli":
        obs = torch.randint(0, 2, (rows, steps, config.obs_dim)).double()
    else:
        obs = torch.randn(rows, steps, config.obs_dim)
    batch = ChainBatch(obs=obs, start=torch.zeros(rows, dtype=torch.long), end=end,
                       features=torch.randn(rows, steps, 6))
    if carried:
        batch = batch.with_(x0=torch.randn(rows, 4), carried=torch.ones(rows, dtype=torch.bool))
    return vmt, batch


def grads(vmt, loss):
    params = [p for p in vmt.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_elbo_equals_per_step_reference(case, carried, float64):
    vmt, batch = make(case, carried)

    pyro.set_rng_seed(123)
    terms = elbo_terms(vmt, batch)
    fast_loss = -terms.elbo_per_row().sum()
    fast_grads = grads(vmt, fast_loss)

    pyro.set_rng_seed(123)
    guide_trace = poutine.trace(reference_guide).get_trace(vmt, batch)
    model_trace = poutine.trace(poutine.replay(reference_model, trace=guide_trace)).get_trace(vmt, batch)
    ref_loss = -(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
    ref_grads = grads(vmt, ref_loss)

    mask = batch.mask().unsqueeze(-1)
    assert torch.allclose(terms.x * mask, reference_path(guide_trace) * mask, rtol=1e-10, atol=1e-12)
    assert torch.allclose(fast_loss, ref_loss, rtol=1e-6, atol=0)
    for fast, ref in zip(fast_grads, ref_grads, strict=True):
        if ref is None:
            assert fast is None or torch.count_nonzero(fast) == 0
            continue
        assert torch.allclose(fast, ref, rtol=1e-6, atol=1e-9)


def test_fast_elbo_equals_pyro_trace_elbo_with_annealing(float64):
    vmt, batch = make("categorical-gated")
    pyro.set_rng_seed(5)
    ours = -elbo_terms(vmt, batch).elbo_per_row(annealing=0.3).sum()
    pyro.set_rng_seed(5)
    theirs = Trace_ELBO().differentiable_loss(vmt.model, vmt.guide, batch, annealing=0.3)
    assert torch.allclose(ours, theirs, rtol=1e-10)


def test_offset_rows_score_like_sliced_sequences(float64):
    """A row starting at position j scores a path exactly like the sequence sliced at j."""
    vmt, batch = make("categorical-gated", rows=1, steps=7)
    x = torch.randn(1, 7, 4, dtype=torch.float64)
    j = 3
    shifted = batch.with_(start=torch.tensor([j]))
    sliced = ChainBatch(obs=batch.obs[:, j:], start=torch.tensor([0]), end=batch.end - j,
                        features=batch.features[:, j:])
    from vmt.models.chain import ChainPrior, GuideChain
    for b, xs in ((shifted, x), (sliced, x[:, j:])):
        ctx = vmt.guide_context(b)
        g = GuideChain(vmt.guide_net, ctx, b).log_prob(xs)
        p = ChainPrior(vmt.prior, vmt.transition, b, 4).log_prob(xs)
        if b is shifted:
            g_shift, p_shift = g, p
    assert torch.allclose(g_shift, g) and torch.allclose(p_shift, p)


def test_folded_reader_serves_as_the_guide_reader_and_reads_in_reverse():
    from vmt.models.reader_spec import build_reader

    reader = build_reader({"kind": "folded", "kwargs": {"segment_length": 4, "d_model": 16,
                                                         "n_heads": 2, "d_ff": 32, "vocab_size": 9}})
    tokens = torch.randint(0, 9, (2, 11))
    lengths = torch.tensor([11, 7])
    out = reader(tokens, lengths)
    assert out.shape == (2, 11, reader.hidden_size)
    changed = tokens.clone()
    changed[0, :3] = (changed[0, :3] + 1) % 9  # the past of position 3 must not matter
    assert torch.allclose(reader(changed, lengths)[0, 3:], out[0, 3:], atol=1e-6)
    config = VMTConfig(state_dim=3, obs_dim=9, feature_dim=reader.hidden_size, guide_hidden=8,
                       transition_hidden=8)
    vmt = VariationalMarkovTransformer(config, reader=reader)
    batch = ChainBatch(obs=tokens, start=torch.zeros(2, dtype=torch.long), end=lengths,
                       reader_input=tokens, reader_lengths=lengths)
    assert torch.isfinite(elbo_terms(vmt, batch).elbo_per_row()).all()
