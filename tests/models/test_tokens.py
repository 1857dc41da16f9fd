"""The token-mixture family: exact identities, normalisation, sampling, and a known source."""

import math

import pytest
import torch

from vmt.inference.elbo import elbo_terms
from vmt.inference.evaluate import evaluate
from vmt.inference.train import TrainConfig, fit
from vmt.models import VariationalMarkovTransformer, VMTConfig
from vmt.models.batch import ChainBatch

TOKEN = dict(prior="token", transition="token", emission="token", guide="token")


def token_vmt(vocab=7, state=12, token_dim=4, feature=5, dtype=torch.float64, **kw):
    config = VMTConfig(state_dim=state, token_dim=token_dim, obs_dim=vocab, feature_dim=feature,
                       guide_hidden=16, prior_components=3, **TOKEN, **kw)
    return VariationalMarkovTransformer(config).to(dtype)


def random_batch(vmt, rows=3, steps=6, x0=False):
    c = vmt.config
    obs = torch.randint(0, c.obs_dim, (rows, steps))
    start = torch.tensor([0, 1, 0])[:rows]
    end = torch.tensor([steps, steps, steps - 2])[:rows]
    batch = ChainBatch(obs=obs, start=start, end=end,
                       features=torch.randn(rows, steps, c.feature_dim, dtype=torch.float64))
    if x0:
        batch = batch.with_(x0=torch.randn(rows, c.state_dim, dtype=torch.float64),
                            carried=torch.tensor([True, False, True])[:rows])
    return batch


def count_calls(monkeypatch, cls, name: str) -> dict:
    """Count the calls of method ``name`` of ``cls`` in ``["n"]`` (the method still runs)."""
    calls = {"n": 0}
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("memory_guide", ["model", "features"])
@pytest.mark.parametrize("x0", [False, True])

def test_elbo_term_is_the_next_token_log_probability(x0, memory_guide):
    """With the guide at its initial (model-step) memory, every position's ELBO term after a
    row's fresh start equals log pi_{y_k}(m_k) exactly, whatever the sampled path."""
    torch.manual_seed(0)
    vmt = token_vmt(reverse=True, memory_guide=memory_guide)
    batch = random_batch(vmt, x0=x0)
    terms = elbo_terms(vmt, batch)
    per = terms.log_lik + terms.log_latent - terms.log_guide
    m, _ = vmt.tokens.split(terms.x)
    lp = vmt.tokens.head_log_probs(m).gather(-1, batch.obs.unsqueeze(-1)).squeeze(-1)
    fresh = batch.first_mask() & ~batch.carried_rows()[:, None]
    check = batch.mask() & ~fresh
    assert check.sum() > 10
    assert torch.allclose(per[check], lp[check], atol=1e-10, rtol=0)


@pytest.mark.parametrize("first_guide", ["features", "fixed"])
def test_fixed_first_guide_reads_nothing_ahead(first_guide):
    """With ``first_guide="fixed"`` and the model's memory step, the sampled path and every
    ELBO term are the same whatever features the reader gives; with ``"features"`` the first
    state of a fresh start follows them."""
    vmt = token_vmt(reverse=True, memory_guide="model", first_guide=first_guide)
    with torch.no_grad():  # a first head that reads its input (zero-initialised biases aside)
        vmt.guide_net.first_head.weight.normal_()
    batch = random_batch(vmt)
    other = batch.with_(features=torch.randn_like(batch.features))
    runs = []
    for b in (batch, other):
        torch.manual_seed(3)
        terms = elbo_terms(vmt, b)
        runs.append((terms.x, terms.log_latent - terms.log_guide))
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    assert same == (first_guide == "fixed")


def test_first_guide_is_checked():
    with pytest.raises(ValueError, match="first_guide must be 'features' or 'fixed', got 'prior'"):
        VMTConfig(first_guide="prior")


def test_slot_density_is_normalised():
    """sum_v pi_v N(u; e_v, s^2) integrates to 1 over a 1-d slot (trapezoid, float64)."""
    torch.manual_seed(1)
    vmt = token_vmt(vocab=3, state=3, token_dim=1, slot_scale=0.3)
    m = torch.randn(2, dtype=torch.float64)
    u = torch.linspace(-15, 15, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        dens = vmt.tokens.slot_log_prob(m.expand(u.shape[0], -1), u).exp()
    assert abs(float(torch.trapezoid(dens, u[:, 0])) - 1) < 1e-8


def test_emission_marginal_is_the_next_token_head():
    """x' ~ p(x'|x), y ~ p(y|x'): the frequency of y matches E[pi(m')] (Monte Carlo)."""
    torch.manual_seed(2)
    vmt = token_vmt(vocab=5, state=8, token_dim=3, slot_scale=0.8)
    x = torch.randn(1, 8, dtype=torch.float64).expand(20000, -1)
    with torch.no_grad():
        nxt = vmt.transition.distribution(x).sample()
        y = vmt.emission.distribution(nxt).sample()
        m, _ = vmt.tokens.split(nxt)
        expected = vmt.tokens.head_log_probs(m).exp().mean(0)
    freq = torch.bincount(y, minlength=5).double() / y.numel()
    assert torch.allclose(freq, expected, atol=0.015)


@pytest.mark.parametrize("part", ["prior", "emission", "guide"])
def test_token_family_is_all_or_nothing(part):
    kw = {**TOKEN, part: {"prior": "mixture", "emission": "categorical", "guide": "gaussian"}[part]}
    with pytest.raises(ValueError, match="token family"):
        VMTConfig(state_dim=8, token_dim=2, **kw)


def test_token_dim_must_leave_a_memory():
    with pytest.raises(ValueError, match="token_dim"):
        VMTConfig(state_dim=4, token_dim=4, **TOKEN)


def markov_source(symbols=20, seed=0):
    """A random first-order Markov chain: transition matrix and its entropy rate (nats)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(symbols, symbols, generator=g, dtype=torch.float64)
    P = torch.softmax(logits, -1)
    # stationary distribution: leading left eigenvector
    w, v = torch.linalg.eig(P.T)
    pi = v[:, torch.argmax(w.real)].real
    pi = pi / pi.sum()
    rate = float(-(pi[:, None] * P * P.log()).sum())
    return P, pi, rate


def sample_documents(P, pi, n, length, seed):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        y = [int(torch.multinomial(pi.float(), 1, generator=g))]
        for _ in range(length - 1):
            y.append(int(torch.multinomial(P[y[-1]].float(), 1, generator=g)))
        docs.append(torch.tensor(y))
    return docs


@pytest.mark.integration
def test_markov_source_reaches_its_entropy_rate():
    """A token-family VMT fitted to a 20-symbol first-order Markov source: its state carries
    the text (KL > 0) and its held-out bound comes within 0.1 nats/token of the entropy rate."""
    P, pi, rate = markov_source()
    train = sample_documents(P, pi, 100, 400, seed=1)
    test = sample_documents(P, pi, 8, 400, seed=2)
    config = VMTConfig(state_dim=40, token_dim=8, obs_dim=20, feature_dim=16, guide_hidden=16,
                       prior_components=2, max_window=64, **TOKEN)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": 16, "vocab_size": 20}}
    torch.manual_seed(0)
    vmt = VariationalMarkovTransformer(config, reader_spec=spec)
    train_config = TrainConfig(regime="windows", steps=400, batch_size=16, window=32,
                               learning_rate=1e-2, aux_weight=0.0, log_every=50)
    result = fit(vmt, train, train_config, progress=False)
    assert result.ok
    bound = evaluate(vmt, test, window=64, particles=4)
    assert bound.neg_iwae_per_token < rate + 0.1, (bound, rate)
    # The state carries the token it emits: the ELBO's KL part is most of the bound.
    torch.manual_seed(3)
    from vmt.inference.windows import DocumentStreams

    win = next(iter(DocumentStreams(test, 4, 32, None)))
    with torch.no_grad():
        terms = elbo_terms(vmt, win.batch.with_(carried=None))
    kl = (terms.log_guide - terms.log_latent)[terms.mask].mean()
    assert float(kl) > 0.5 * rate
    assert math.isfinite(float(kl))


def test_basis_parameterisation_shapes_and_checks():
    """With fixed token vectors the embeddings and head go through them; a wrong basis shape
    is refused with the shapes named."""
    torch.manual_seed(4)
    vmt = token_vmt(vocab=7, state=12, token_dim=4, token_basis_dim=5)
    with pytest.raises(ValueError, match=r"\(7, 5\)"):
        vmt.tokens.set_basis(torch.randn(7, 6))
    basis = torch.randn(7, 5, dtype=torch.float64)
    vmt.tokens.set_basis(basis)
    assert torch.allclose(vmt.tokens.basis.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    table = vmt.tokens.table()
    assert table.shape == (7, 4)
    # tokens with equal basis vectors share embeddings (up to the per-token head bias)
    same = basis.clone()
    same[3] = same[2]
    vmt.tokens.set_basis(same)
    assert torch.allclose(vmt.tokens.table()[2], vmt.tokens.table()[3])
    batch = random_batch(vmt)
    terms = elbo_terms(vmt, batch)
    assert torch.isfinite(terms.log_latent).all()
    with pytest.raises(ValueError, match="no basis"):
        token_vmt().tokens.set_basis(basis)


def test_shared_scores_compute_the_vocabulary_product_once(monkeypatch):
    """Inside one ELBO the prior, transition and emission score each state tensor once (one
    vocabulary-sized product instead of three), with the same values and gradients as
    scoring every term on its own."""
    from vmt.models.tokens import TokenMixture

    torch.manual_seed(0)
    vmt = token_vmt()
    batch = random_batch(vmt, x0=True)
    calls = count_calls(monkeypatch, TokenMixture, "_slot_log_density")
    torch.manual_seed(1)
    shared = elbo_terms(vmt, batch)
    assert calls["n"] == 1
    loss = -shared.elbo_per_row().sum()
    grads = torch.autograd.grad(loss, list(vmt.tokens.parameters()))

    calls["n"] = 0
    with monkeypatch.context() as patch:  # no memo: every term computes its own scores
        patch.setattr(TokenMixture, "sharing", lambda self: __import__("contextlib").nullcontext())
        torch.manual_seed(1)
        alone = elbo_terms(vmt, batch)
        assert calls["n"] == 3
        grads_alone = torch.autograd.grad(-alone.elbo_per_row().sum(), list(vmt.tokens.parameters()))
    for name in ("log_lik", "log_latent", "log_guide"):
        assert torch.allclose(getattr(shared, name), getattr(alone, name), atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, grads_alone))
    # outside a sharing block nothing is kept
    assert vmt.tokens._memo is None


def test_head_dropout_acts_in_training_only_and_keeps_one_mask_per_state(monkeypatch):
    from vmt.models.tokens import TokenMixture

    torch.manual_seed(0)
    vmt = token_vmt(head_dropout=0.5)
    batch = random_batch(vmt)
    vmt.train()
    calls = count_calls(monkeypatch, TokenMixture, "head_logits")
    terms = elbo_terms(vmt, batch)
    # one head pass (so one dropout mask) per sampled path, shared by prior, transition and emission
    assert calls["n"] == 1
    monkeypatch.undo()
    m, _ = vmt.tokens.split(terms.x)
    with torch.no_grad():
        vmt.eval()
        a = vmt.tokens.head_log_probs(m)
        assert torch.equal(a, vmt.tokens.head_log_probs(m))  # no dropout in eval mode
        vmt.train()
        assert not torch.equal(a, vmt.tokens.head_log_probs(m))
    with pytest.raises(ValueError, match="head_dropout"):
        token_vmt(head_dropout=1.0)
