"""The held-out diagnostics of ``evaluate``: the split of the bound, the explained variance of
the state and the mutual-information estimates, on models built by hand so the answers are
known: a collapsed model (guide equal to the transition) and a model whose state encodes its
token."""

import math

import pytest
import torch
from torch.nn import functional as F

from vmt.inference.evaluate import evaluate, prior_marginal_variance
from vmt.inference.train import TrainConfig, fit
from vmt.models import VariationalMarkovTransformer, VMTConfig


def softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


def random_documents(vocab: int, n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(60, 100, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def collapsed_vmt(state: int = 3, vocab: int = 5, a: float = 0.5, noise: float = 0.4):
    """A linear-Gaussian VMT whose guide *is* the transition (and, at a fresh start, the
    prior): ``q(x_1 | .) = p(x_1)``, ``q(x_k | x_{k-1}, .) = p(x_k | x_{k-1})``. Its prior is
    the chain's stationary law, so no position differs from another either."""
    config = VMTConfig(state_dim=state, obs_dim=vocab, feature_dim=4, guide_hidden=8,
                       transition="linear", prior_components=2, max_window=64)
    vmt = VariationalMarkovTransformer(config).double()
    stationary = noise / math.sqrt(1 - a * a)
    eye = torch.eye(state, dtype=torch.float64)
    g = vmt.guide_net
    with torch.no_grad():
        vmt.transition.matrix.copy_(a * eye)
        vmt.transition.bias.zero_()
        vmt.transition.scale = torch.full((state,), noise, dtype=torch.float64)
        vmt.prior.loc.zero_()
        vmt.prior.scale = torch.full((2, state), stationary, dtype=torch.float64)
        for head, scale in ((g.first_head, stationary), (g.step_head, noise)):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[state:] = softplus_inverse(scale - config.min_scale)
        g.state_skip.weight.copy_(a * eye)
    return vmt


def encoding_vmt(vocab: int = 4, code: float = 4.0, sharpness: float = 5.0, spread: float = 0.05):
    """A VMT whose guide puts ``x_k`` at ``code * onehot(y_k)`` (reading one-hot features of the
    token) and whose emission reads the token back off the state almost surely."""
    config = VMTConfig(state_dim=vocab, obs_dim=vocab, feature_dim=vocab, guide_hidden=vocab,
                       max_window=64)
    vmt = VariationalMarkovTransformer(config).double()
    g = vmt.guide_net
    eye = torch.eye(vocab, dtype=torch.float64)
    scale = softplus_inverse(spread - config.min_scale)
    with torch.no_grad():
        g.feature_proj.weight.copy_(10 * eye)  # tanh(10) ~ 1: combined = onehot(y_k)
        g.feature_proj.bias.zero_()
        g.ahead_proj.weight.zero_()
        g.skip_proj.weight.zero_()
        g.state_proj.weight.zero_()
        g.state_proj.bias.zero_()
        g.state_skip.weight.zero_()
        # first position: combined = tanh(context); later: combined = 0.5 * tanh(context)
        for head, gain in ((g.first_head, code), (g.step_head, 2 * code)):
            head.weight.zero_()
            head.weight[:vocab] = gain * eye
            head.bias.zero_()
            head.bias[vocab:] = scale
        vmt.emission.net.weight.copy_(sharpness * eye)
        vmt.emission.net.bias.zero_()
    return vmt


def onehot_features(documents, vocab):
    table = [F.one_hot(d, vocab).double() for d in documents]
    return lambda i: (table[i], None)


def test_the_split_of_the_bound_sums_to_the_negative_elbo():
    vocab = 5
    vmt = collapsed_vmt(vocab=vocab)
    with torch.no_grad():  # a guide that is not the transition, so every term is non-zero
        vmt.guide_net.step_head.weight.normal_(0, 0.3)
    docs = random_documents(vocab)
    feats = [torch.randn(len(d), 4, dtype=torch.float64) for d in docs]
    penalty = torch.tensor([math.log(7.0), 0, 0, 0, 0], dtype=torch.float64)
    res = evaluate(vmt, docs, lambda i: (feats[i], None), window=16, particles=6,
                   token_penalty=penalty)
    total = res.reconstruction_per_token + res.kl_per_token + res.oov_per_token
    assert res.neg_elbo_per_token == pytest.approx(total, rel=1e-12, abs=0)
    assert res.kl_per_token > 0.01 and res.reconstruction_per_token > 0
    zeros = sum(int((d == 0).sum()) for d in docs)
    assert res.oov_per_token == pytest.approx(zeros * math.log(7.0) / res.tokens, rel=1e-12)
    # the per-document totals add up to the totals, in document order
    assert [d.index for d in res.per_document] == list(range(len(docs)))
    assert [d.tokens for d in res.per_document] == [len(d) for d in docs]
    assert sum(d.neg_elbo for d in res.per_document) / res.tokens == pytest.approx(
        res.neg_elbo_per_token, rel=1e-12)
    assert sum(d.neg_iwae for d in res.per_document) / res.tokens == pytest.approx(
        res.neg_iwae_per_token, rel=1e-12)
    assert res.iwae_per_token == res.neg_iwae_per_token  # the older name, kept as an alias
    assert all(d.neg_iwae <= d.neg_elbo + 1e-9 for d in res.per_document)


def test_a_collapsed_model_reports_no_kl_and_no_explained_variance():
    vocab = 5
    vmt = collapsed_vmt(vocab=vocab)
    docs = random_documents(vocab)
    feats = [torch.randn(len(d), 4, dtype=torch.float64) for d in docs]
    res = evaluate(vmt, docs, lambda i: (feats[i], None), window=16, particles=8)
    assert abs(res.kl_per_token) < 1e-9  # log q - log p is zero at every position
    # without the k-particle correction the fraction would be ~1/k = 0.125
    assert res.explained_variance_max < 0.05
    assert res.prior_variance_fraction_max < 0.05
    assert res.active_units == 0 and res.explained_dims == 0
    assert abs(res.mutual_information_nce) < 0.1
    # the prior is the stationary law: its variance is known
    stationary = 0.4**2 / (1 - 0.5**2)
    assert res.prior_variance == pytest.approx((stationary,) * 3, rel=1e-12)
    assert sum(res.posterior_variance) / 3 == pytest.approx(stationary, rel=0.15)


def test_a_model_whose_state_encodes_the_token_explains_the_variance_and_the_information():
    vocab = 4
    vmt = encoding_vmt(vocab)
    docs = random_documents(vocab)
    res = evaluate(vmt, docs, onehot_features(docs, vocab), window=16, particles=4)
    counts = torch.bincount(torch.cat(docs), minlength=vocab).double()
    p = counts / counts.sum()
    entropy = float(-(p * p.log()).sum())
    assert res.token_entropy == pytest.approx(entropy, rel=1e-12)
    assert res.reconstruction_per_token < 1e-3
    assert res.mutual_information == pytest.approx(entropy, abs=1e-3)
    assert res.mutual_information_nce == pytest.approx(entropy, abs=0.15)
    assert min(res.explained_variance) > 0.99
    assert res.explained_dims == vocab and res.active_units == vocab
    assert res.kl_per_token > 1.0  # the information is paid for in KL


def test_prior_marginal_variance_of_the_mixture_matches_sampling():
    vmt = VariationalMarkovTransformer(VMTConfig(state_dim=3, obs_dim=5, feature_dim=4,
                                                 prior_components=3)).double()
    with torch.no_grad():
        vmt.prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
        vmt.prior.loc.normal_(0, 2)
    exact = prior_marginal_variance(vmt)
    draws = vmt.prior.distribution().sample((400_000,))
    assert torch.allclose(exact, draws.var(0), rtol=0.02)
    flow = VariationalMarkovTransformer(VMTConfig(state_dim=3, obs_dim=5, feature_dim=4,
                                                  prior="flow"))
    state = torch.get_rng_state()
    sampled = prior_marginal_variance(flow)
    assert torch.equal(state, torch.get_rng_state())  # the global stream is untouched
    assert torch.equal(sampled, prior_marginal_variance(flow)) and bool((sampled > 0).all())


def test_training_history_splits_the_negative_elbo():
    vocab = 6
    docs = random_documents(vocab, n=4)
    config = VMTConfig(state_dim=3, obs_dim=vocab, feature_dim=8, guide_hidden=8,
                       transition_hidden=8, max_window=32)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": 8, "vocab_size": vocab}}
    vmt = VariationalMarkovTransformer(config, reader_spec=spec)
    cfg = TrainConfig(steps=4, batch_size=2, max_length=8, budget=32, log_every=1,
                      annealing_start=0.5, annealing_steps=4)
    result = fit(vmt, docs, cfg, progress=False)
    assert len(result.history) == 4
    for h in result.history:
        assert -h["elbo_per_token"] == pytest.approx(
            h["reconstruction_per_token"] + h["kl_per_token"], rel=1e-5)


@pytest.mark.parametrize("emission", ["bernoulli", "gaussian"])
def test_vector_observations_get_every_diagnostic_but_the_token_entropy(emission):
    obs = 6
    config = VMTConfig(state_dim=3, obs_dim=obs, feature_dim=4, guide_hidden=8,
                       transition_hidden=8, emission=emission, max_window=64)
    vmt = VariationalMarkovTransformer(config).double()
    g = torch.Generator().manual_seed(1)
    docs = [torch.rand(n, obs, generator=g, dtype=torch.float64) for n in (30, 45, 20)]
    if emission == "bernoulli":
        docs = [(d > 0.5).double() for d in docs]
    feats = [torch.randn(len(d), 4, dtype=torch.float64) for d in docs]
    res = evaluate(vmt, docs, lambda i: (feats[i], None), window=16, particles=3, streams=2)
    assert res.neg_elbo_per_token == pytest.approx(
        res.reconstruction_per_token + res.kl_per_token, rel=1e-12)
    assert res.token_entropy is None and res.mutual_information is None
    assert math.isfinite(res.mutual_information_nce)
    assert len(res.explained_variance) == 3 and all(0 <= v <= 1 for v in res.explained_variance)
    # one particle: the spread within the posterior cannot be estimated
    single = evaluate(vmt, docs, lambda i: (feats[i], None), window=16, particles=1, streams=2)
    assert single.explained_variance_max is None and single.explained_variance == ()
    assert "explained variance" not in single.summary() and "KL" in single.summary()
