"""The whole-chain sites keep Pyro's distribution contract (shapes, ``expand``, sampling).

In the style of Pyro's own distribution tests: a shape table over ``sample_shape`` and
``batch_shape``, ``expand`` checks, and goodness-of-fit tests of ``sample`` against
``log_prob`` (:mod:`pyro.distributions.testing.gof`). Then the Pyro machinery that needs the
contract: vectorised ELBO particles equal repeated rows (float64), and prior predictive
sampling with :class:`pyro.infer.Predictive` on a batch without observations.
"""

import itertools

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions.testing.gof import auto_goodness_of_fit, multinomial_goodness_of_fit
from pyro.infer import Predictive, Trace_ELBO

from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig
from vmt.models.chain import ChainPrior, GuideChain, SequenceEmission

TEST_FAILURE_RATE = 1e-3  # a correct sampler fails one of these tests once in a thousand runs

CASES = {
    "categorical-gated": dict(emission="categorical", obs_dim=5, transition="gated"),
    "bernoulli-flows": dict(emission="bernoulli", obs_dim=3, prior="flow", transition="flow", guide="flow"),
    "gaussian-linear": dict(emission="gaussian", obs_dim=2, transition="linear"),
    "gaussian-full-guide": dict(emission="gaussian", obs_dim=2, guide="full"),
}
ROWS, STEPS, STATE = 3, 4, 2


def make(case, carried=False, rows=ROWS, steps=STEPS, seed=0, state=STATE):
    """A float64 VMT and a batch whose rows start and end at different positions."""
    torch.manual_seed(seed)
    config = VMTConfig(state_dim=state, feature_dim=6, guide_hidden=8, transition_hidden=8,
                       prior_components=3, max_window=16, **CASES[case])
    vmt = VariationalMarkovTransformer(config).double()
    if config.guide == "full":  # off-diagonal factors start at zero: make them matter
        torch.nn.init.normal_(vmt.guide_net.tril_head.weight, std=0.5)
        torch.nn.init.normal_(vmt.guide_net.tril_head.bias, std=0.5)
    start = torch.tensor([0, 1, 0])[:rows]
    end = torch.tensor([steps, steps, 2])[:rows]
    if config.emission == "categorical":
        obs = torch.randint(0, config.obs_dim, (rows, steps))
    elif config.emission == "bernoulli":
        obs = torch.randint(0, 2, (rows, steps, config.obs_dim)).double()
    else:
        obs = torch.randn(rows, steps, config.obs_dim, dtype=torch.float64)
    batch = ChainBatch(obs=obs, start=start, end=end,
                       features=torch.randn(rows, steps, 6, dtype=torch.float64))
    if carried:
        batch = batch.with_(x0=torch.randn(rows, state, dtype=torch.float64),
                            carried=torch.tensor([True, False, True])[:rows])
    return vmt, batch


def chain_distributions(vmt, batch):
    prior = ChainPrior(vmt.prior, vmt.transition, batch, vmt.config.state_dim)
    guide = GuideChain(vmt.guide_net, vmt.guide_context(batch), batch)
    with torch.no_grad():
        x = guide.sample()
    emission = SequenceEmission(vmt.emission, x, batch)
    return {"prior": prior, "guide": guide, "emission": emission}


def event_shape(vmt, name):
    if name != "emission":
        return (STEPS, STATE)
    return (STEPS,) if vmt.config.emission == "categorical" else (STEPS, vmt.config.obs_dim)


# -- shape table ----------------------------------------------------------------------------
SAMPLE_SHAPES = [(), (2,), (2, 1)]
BATCH_SHAPES = [(ROWS,), (4, ROWS), (2, 1, ROWS)]


@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES, ids=str)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("name", ["prior", "guide", "emission"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes(case, name, batch_shape, sample_shape):
    vmt, batch = make(case, carried=True)
    d = chain_distributions(vmt, batch)[name].expand(batch_shape)
    event = event_shape(vmt, name)
    assert d.batch_shape == batch_shape and d.event_shape == event
    value = d.sample(sample_shape)
    assert value.shape == sample_shape + batch_shape + event
    log_prob = d.log_prob(value)
    assert log_prob.shape == sample_shape + batch_shape
    assert torch.isfinite(log_prob).all()
    # a value without the leading dimensions is broadcast against the batch shape
    one = value.reshape(-1, *value.shape[-len(event) - 1:])[0]  # (batch, *event)
    assert d.log_prob(one).shape == batch_shape


@pytest.mark.parametrize("name", ["prior", "guide"])
def test_rsample_has_gradients_through_every_shape(name):
    vmt, batch = make("gaussian-linear")
    d = chain_distributions(vmt, batch)[name].expand((2, ROWS))
    if name == "guide":
        x = d.rsample((3,))
        x.sum().backward()
        assert vmt.guide_net.first_head.weight.grad.abs().sum() > 0
    else:
        assert not d.has_rsample


# -- expand ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prior", "guide", "emission"])
def test_expand(name):
    vmt, batch = make("categorical-gated", carried=True)
    d = chain_distributions(vmt, batch)[name]
    big = d.expand((5, ROWS))
    assert big.batch_shape == (5, ROWS) and d.batch_shape == (ROWS,)  # the original is unchanged
    assert big.expand((2, 5, ROWS)).batch_shape == (2, 5, ROWS)
    assert d.expand_by((2, 5)).batch_shape == (2, 5, ROWS)
    assert d.expand((ROWS,)).batch_shape == (ROWS,)
    with pytest.raises(ValueError, match=r"cannot be expanded to \(5, 4\)"):
        d.expand((5, ROWS + 1))
    with pytest.raises(ValueError, match=r"cannot be expanded to \(\)"):
        big.expand(())
    # every slot of an expanded distribution scores a value as the original does
    value = d.sample()
    assert torch.allclose(big.log_prob(value), d.log_prob(value).expand(5, ROWS), rtol=1e-12)
    stacked = torch.stack([value, d.sample(), d.sample()])
    assert torch.allclose(d.log_prob(stacked)[1], d.log_prob(stacked[1]), rtol=1e-12)


@pytest.mark.parametrize("name", ["prior", "guide"])
def test_expanded_draws_equal_repeated_rows(name):
    """A ``(k, batch)`` expansion draws what a batch of ``k`` stacked copies draws."""
    k = 3
    vmt, batch = make("bernoulli-flows", carried=True)
    d = chain_distributions(vmt, batch)[name]
    tiled_batch = tile(batch, k)
    tiled = chain_distributions(vmt, tiled_batch)[name]
    torch.manual_seed(1)
    expanded = d.expand((k, ROWS)).sample()
    torch.manual_seed(1)
    repeated = tiled.sample()
    assert torch.allclose(expanded.reshape(k * ROWS, STEPS, STATE), repeated, rtol=1e-12, atol=1e-12)


# -- sample against log_prob ----------------------------------------------------------------
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("name", ["prior", "guide"])
def test_one_state_sample_agrees_with_log_prob(name, carried):
    """Pyro's density goodness of fit on a one-position, one-dimensional chain (the first
    state: the prior mixture or ``q(x_1 | h_1, T)``; carried, a transition out of ``x0``)."""
    vmt, batch = make("categorical-gated", carried=carried, rows=1, steps=1, state=1)
    d = chain_distributions(vmt, batch)[name]
    torch.manual_seed(2)
    with torch.no_grad():
        x = d.sample((10000,))  # (draw, batch, time, state)
        probs = d.log_prob(x).exp()[:, 0]
    assert auto_goodness_of_fit(x.reshape(-1), probs) > TEST_FAILURE_RATE


PATH_CASES = [  # (case, rows, steps, carried)
    ("categorical-gated", 3, 4, True),
    ("categorical-gated", 3, 4, False),
    ("gaussian-linear", 3, 4, True),
    # untrained flows bend multi-step paths too far from any Gaussian reference for
    # finite-variance weights: one position, from the prior (flow) and from x0 (flow transition)
    ("bernoulli-flows", 1, 1, False),
    ("bernoulli-flows", 1, 1, True),
]


@pytest.mark.parametrize("name", ["prior", "guide"])
@pytest.mark.parametrize(("case", "rows", "steps", "carried"), PATH_CASES)
def test_path_sample_agrees_with_log_prob(case, rows, steps, carried, name):
    """Whole paths: ``E_{x ~ d}[r(x) / d(x)] = 1`` for a normalised reference density ``r``.

    ``r`` is a Gaussian with the draws' mean and a slightly shrunk copy of their covariance
    over each row's active positions, so the weights have finite variance; a ``log_prob`` off
    by a constant, or scoring another density than the sampler draws from, moves the mean
    away from 1. Tolerance: 5 standard errors.
    """
    vmt, batch = make(case, carried=carried, rows=rows, steps=steps)
    d = chain_distributions(vmt, batch)[name]
    torch.manual_seed(3)
    with torch.no_grad():
        x = d.sample((20000,))  # (draw, batch, time, state)
        log_d = d.log_prob(x)  # (draw, batch)
    for row in range(rows):
        active = x[:, row, batch.start[row] : batch.end[row]].flatten(1)  # (draw, active * state)
        cov = torch.cov(active.T)
        reference = torch.distributions.MultivariateNormal(active.mean(0), 0.8**2 * cov)
        w = (reference.log_prob(active) - log_d[:, row]).exp()
        se = w.std() / len(w) ** 0.5
        assert (w.mean() - 1).abs() < 5 * se, (row, w.mean(), se)
        assert se < 0.05  # the check has power


def test_sample_agrees_with_log_prob_for_tokens():
    """Multinomial goodness of fit of the emitted token pairs against ``exp(log_prob)``."""
    vmt, batch = make("categorical-gated", rows=1, steps=2)
    x = torch.randn(1, 2, STATE, dtype=torch.float64)
    d = SequenceEmission(vmt.emission, x, batch)
    torch.manual_seed(3)
    draws = d.sample((20000,))[:, 0]  # (draw, time)
    vocab = vmt.config.obs_dim
    pairs = torch.tensor(list(itertools.product(range(vocab), repeat=2)))
    with torch.no_grad():
        probs = d.log_prob(pairs[:, None]).exp()[:, 0]
    counts = torch.stack([(draws == p).all(-1).sum() for p in pairs]).double()
    assert torch.allclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
    assert multinomial_goodness_of_fit(probs, counts, total_count=len(draws)) > TEST_FAILURE_RATE


# -- Pyro's machinery -----------------------------------------------------------------------
def tile(batch: ChainBatch, k: int) -> ChainBatch:
    """``k`` stacked copies of every row (copy-major), reading the same features."""
    rows = batch.num_rows
    return ChainBatch(
        obs=batch.obs.repeat(k, *([1] * (batch.obs.dim() - 1))), start=batch.start.repeat(k),
        end=batch.end.repeat(k), features=batch.features, source=torch.arange(rows).repeat(k),
        x0=None if batch.x0 is None else batch.x0.repeat(k, 1),
        carried=None if batch.carried is None else batch.carried.repeat(k),
    )


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_vectorized_particles_equal_repeated_rows(case, carried):
    k = 4
    vmt, batch = make(case, carried)
    params = [p for p in vmt.parameters() if p.requires_grad]
    pyro.set_rng_seed(11)
    vectorized = Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    loss = vectorized.differentiable_loss(vmt.model, vmt.guide, batch, annealing=0.7)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pyro.set_rng_seed(11)
    repeated = Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        vmt.model, vmt.guide, tile(batch, k), annealing=0.7) / k
    repeated_grads = torch.autograd.grad(repeated, params, allow_unused=True)
    assert torch.allclose(loss, repeated, rtol=1e-10, atol=0)
    for g, r in zip(grads, repeated_grads, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r, rtol=1e-8, atol=1e-12)


ELBOS = {
    "trace": lambda: Trace_ELBO(),
    "trace-vectorized": lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
    "tracegraph-vectorized": lambda: pyro.infer.TraceGraph_ELBO(num_particles=2, vectorize_particles=True),
    "meanfield": lambda: pyro.infer.TraceMeanField_ELBO(),
    "renyi-vectorized": lambda: pyro.infer.RenyiELBO(alpha=0.5, num_particles=3, vectorize_particles=True),
}


@pytest.mark.parametrize("elbo", sorted(ELBOS))
def test_pyro_elbos_score_a_vmt(elbo):
    """Every Pyro ELBO estimates a finite loss, and the differentiable ones give gradients to
    the guide's networks (the training loops step a torch optimiser on those)."""
    vmt, batch = make("categorical-gated", carried=True)
    estimator = ELBOS[elbo]()
    assert torch.isfinite(torch.tensor(estimator.loss(vmt.model, vmt.guide, batch)))
    if hasattr(estimator, "differentiable_loss"):
        loss = estimator.differentiable_loss(vmt.model, vmt.guide, batch)
        (grad,) = torch.autograd.grad(loss, [vmt.guide_net.first_head.weight])
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_posterior_predictive_with_the_guide_and_importance_sampling():
    vmt, batch = make("categorical-gated")
    with torch.no_grad():
        pred = Predictive(vmt.model, guide=vmt.guide, num_samples=4, parallel=True,
                          return_sites=["x", "y"])(batch.with_(obs=None))
        assert pred["x"].shape == (4, ROWS, STEPS, STATE) and pred["y"].shape == (4, ROWS, STEPS)
        importance = pyro.infer.Importance(vmt.model, vmt.guide, num_samples=5).run(batch)
    weights = torch.stack(importance.log_weights)
    assert weights.shape == (5,) and torch.isfinite(weights).all()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prior_predictive_samples_states_and_observations(case, parallel):
    vmt, _ = make(case)
    n, rows, steps = 5, 2, 6
    batch = ChainBatch.unobserved(rows, steps)
    pyro.set_rng_seed(4)
    with torch.no_grad():
        samples = Predictive(vmt.model, num_samples=n, parallel=parallel)(batch)
    obs_shape = () if case.startswith("categorical") else (vmt.config.obs_dim,)
    assert samples["x"].shape == (n, rows, steps, STATE)
    assert samples["y"].shape == (n, rows, steps, *obs_shape)
    assert torch.isfinite(samples["x"]).all()
    assert not torch.allclose(samples["x"][0], samples["x"][1])  # independent draws
    if case.startswith("categorical"):
        assert samples["y"].dtype == torch.long
        assert int(samples["y"].min()) >= 0 and int(samples["y"].max()) < vmt.config.obs_dim
    # each draw is ancestral: its tokens score finitely under the states that emitted them
    scored = SequenceEmission(vmt.emission, samples["x"], batch).log_prob(samples["y"])
    assert scored.shape == (n, rows) and torch.isfinite(scored).all()


def test_prior_predictive_states_follow_the_prior():
    """The first state of prior predictive draws has the prior's mean (Monte Carlo, 5 sd)."""
    vmt, _ = make("gaussian-linear")
    pyro.set_rng_seed(5)
    with torch.no_grad():
        x1 = Predictive(vmt.model, num_samples=4000, parallel=True)(ChainBatch.unobserved(1, 2))["x"][:, 0, 0]
        reference = vmt.prior.distribution().sample((200000,))
    sd = reference.std(0) / 4000**0.5
    assert ((x1.mean(0) - reference.mean(0)).abs() < 5 * sd).all()


def test_poutine_condition_and_trace_see_one_site_per_chain():
    vmt, batch = make("gaussian-linear")
    x = torch.zeros(2, ROWS, STEPS, STATE, dtype=torch.float64)
    with pyro.plate("draws", 2, dim=-2):
        trace = poutine.trace(poutine.condition(vmt.model, {"x": x})).get_trace(batch)
    trace.compute_log_prob()
    assert trace.nodes["x"]["log_prob"].shape == (2, ROWS)
    assert trace.nodes["y"]["log_prob"].shape == (2, ROWS)
