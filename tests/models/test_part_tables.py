"""Each part of a VMT alone, in the style of Pyro's distribution tests: shape tables with
failing rows, and ``sample`` against ``log_prob``.

Parts: the prior ``p(x_1)``, the transition ``p(x_k | x_{k-1})``, the emission ``p(y_k | x_k)``
and the guide's conditional at a position (:meth:`GuideChain.position_distribution`: the first
state ``q(x_1 | h_1, T)``, or a step from a carried state). Then the chain-level table: offset
starts, carried states, 2-D (token) and 3-D (vector) observations, and the batches that must
fail with a ``ValueError`` naming what is wrong.

All float64 and seeded. Sampling checks and their tolerances:

* continuous parts: ``E_{x ~ d}[r(x) / d(x)] = 1`` for a Gaussian reference ``r`` fitted to
  the draws (a likelihood-ratio check: a ``log_prob`` off by a constant or scoring another
  density than the sampler's moves the mean), within 5 standard errors;
* token emission: the draws' frequencies against ``exp(log_prob)`` (Pyro's multinomial
  goodness of fit, failure rate 1e-3);
* Bernoulli and Gaussian emissions: the draws' mean and variance against the distribution's,
  within 5 standard errors.
"""

import pytest
import torch
from pyro.distributions.testing.gof import multinomial_goodness_of_fit

from vmt.inference.elbo import elbo_terms
from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig
from vmt.models.chain import GuideChain

STATE, FEATURE, OBS = 2, 6, 3
KINDS = {  # one VMT per family of parts
    "mixture-gated-categorical": dict(prior="mixture", transition="gated", emission="categorical", obs_dim=5),
    "mixture-linear-gaussian": dict(prior="mixture", transition="linear", emission="gaussian", obs_dim=OBS),
    "flow-flow-bernoulli": dict(prior="flow", transition="flow", emission="bernoulli", obs_dim=OBS, guide="flow"),
}
X_SHAPES = [(STATE,), (4, STATE), (3, 4, STATE)]  # states (..., state): one, a row, a window


def make_vmt(kind: str) -> VariationalMarkovTransformer:
    torch.manual_seed(0)
    config = VMTConfig(state_dim=STATE, feature_dim=FEATURE, guide_hidden=8, transition_hidden=8,
                       prior_components=3, max_window=16, **KINDS[kind])
    return VariationalMarkovTransformer(config).double()


def observations(vmt, shape: tuple[int, ...]) -> torch.Tensor:
    """Observations with batch shape ``shape``: ``shape`` ids or ``shape + (obs,)`` values."""
    c = vmt.config
    if c.emission == "categorical":
        return torch.randint(0, c.obs_dim, shape)
    if c.emission == "bernoulli":
        return torch.randint(0, 2, shape + (c.obs_dim,)).double()
    return torch.randn(shape + (c.obs_dim,), dtype=torch.float64)


def ratio_check(d, draws: int = 20000) -> None:
    """``E[r(x) / d(x)] = 1`` over draws of ``d`` (batch shape ``()``, event ``(state,)``)."""
    with torch.no_grad():
        x = d.sample((draws,))  # (draw, state)
        log_d = d.log_prob(x)  # (draw,)
    reference = torch.distributions.MultivariateNormal(x.mean(0), 0.8**2 * torch.cov(x.T))
    w = (reference.log_prob(x) - log_d).exp()
    se = w.std() / len(w) ** 0.5
    assert (w.mean() - 1).abs() < 5 * se, (float(w.mean()), float(se))
    assert se < 0.05  # the check has power


# -- shape tables ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("sample_shape", [(), (5,), (2, 5)], ids=str)
def test_prior_shapes(kind, sample_shape, float64):
    prior = make_vmt(kind).prior.distribution()
    assert prior.batch_shape == () and prior.event_shape == (STATE,)
    x = prior.sample(sample_shape)
    assert x.shape == sample_shape + (STATE,)
    assert prior.log_prob(x).shape == sample_shape


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("x_shape", X_SHAPES, ids=str)
def test_transition_shapes(kind, x_shape, float64):
    d = make_vmt(kind).transition.distribution(torch.randn(x_shape))
    assert d.batch_shape == x_shape[:-1] and d.event_shape == (STATE,)
    x = d.sample((2,))
    assert x.shape == (2,) + x_shape
    assert d.log_prob(x).shape == (2,) + x_shape[:-1]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("x_shape", X_SHAPES, ids=str)
def test_emission_shapes(kind, x_shape, float64):
    vmt = make_vmt(kind)
    emission, batch = vmt.emission, x_shape[:-1]
    d = emission.distribution(torch.randn(x_shape))
    assert d.batch_shape == batch and d.event_shape == tuple(emission.obs_shape)
    y = observations(vmt, batch)
    assert d.sample().shape == y.shape
    assert emission.log_prob(torch.randn(x_shape), y).shape == batch


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_guide_position_shapes(kind, carried, rows, float64):
    vmt = make_vmt(kind)
    batch = ChainBatch(obs=observations(vmt, (rows, 4)), start=torch.zeros(rows, dtype=torch.long),
                       end=torch.full((rows,), 4), features=torch.randn(rows, 4, FEATURE))
    if carried:
        batch = batch.with_(x0=torch.randn(rows, STATE), carried=torch.ones(rows, dtype=torch.bool))
    guide = GuideChain(vmt.guide_net, vmt.guide_context(batch), batch)
    x = guide.sample((2,))
    assert x.shape == (2, rows, 4, STATE)
    d = guide.position_distribution(x)
    assert d.batch_shape == (2, rows, 4) and d.event_shape == (STATE,)
    assert d.log_prob(x).shape == (2, rows, 4)


BAD_PARTS = [  # (part, call, the shape the message must name)
    ("transition", lambda v: v.transition.distribution(torch.randn(4, STATE + 1)), "(4, 3)"),
    ("transition", lambda v: v.transition.distribution(torch.tensor(1.0)), "()"),
    ("emission", lambda v: v.emission.distribution(torch.randn(4, STATE + 2)), "(4, 4)"),
    ("emission", lambda v: v.emission.log_prob(torch.randn(4, STATE), torch.randn(4, OBS + 1)), "(4, 4)"),
]


@pytest.mark.parametrize(("part", "call", "shape"), BAD_PARTS)
def test_parts_name_the_wrong_shape(part, call, shape, float64):
    vmt = make_vmt("mixture-linear-gaussian")
    with pytest.raises(ValueError, match=f"got {shape.replace('(', '[(]').replace(')', '[)]')}"):
        call(vmt)


def test_token_emission_refuses_float_ids(float64):
    vmt = make_vmt("mixture-gated-categorical")
    with pytest.raises(ValueError, match="integer token ids"):
        vmt.emission.log_prob(torch.randn(4, STATE), torch.ones(4))


# -- the chain-level table: offsets, carried states, 2-D and 3-D observations ----------------
CHAIN_ROWS = [  # (kind, start, end, carried)
    ("mixture-gated-categorical", [0, 0], [4, 4], None),
    ("mixture-gated-categorical", [1, 0], [4, 2], None),  # offset starts, early ends
    ("mixture-gated-categorical", [1, 0], [4, 3], [True, False]),  # a carried row
    ("mixture-linear-gaussian", [0, 2], [4, 4], [False, True]),  # 3-D observations
    ("flow-flow-bernoulli", [0, 1], [3, 4], [True, True]),
]


@pytest.mark.parametrize(("kind", "start", "end", "carried"), CHAIN_ROWS)
def test_chain_shapes(kind, start, end, carried, float64):
    vmt = make_vmt(kind)
    obs = observations(vmt, (2, 4))
    assert obs.dim() == (2 if vmt.config.emission == "categorical" else 3)
    batch = ChainBatch(obs=obs, start=torch.tensor(start), end=torch.tensor(end),
                       features=torch.randn(2, 4, FEATURE))
    if carried is not None:
        batch = batch.with_(x0=torch.randn(2, STATE), carried=torch.tensor(carried))
    terms = elbo_terms(vmt, batch)
    assert terms.x.shape == (2, 4, STATE)
    for t in (terms.log_lik, terms.log_latent, terms.log_guide):
        assert t.shape == (2, 4)
        assert bool((t[~batch.mask()] == 0).all())  # nothing is scored outside a row
    assert terms.tokens_per_row().tolist() == [e - s for s, e in zip(start, end)]


def _batch(**change):
    fields = dict(obs=torch.randint(0, 5, (2, 4)), start=torch.tensor([0, 1]), end=torch.tensor([4, 3]),
                  features=torch.randn(2, 4, FEATURE))
    fields.update(change)
    return ChainBatch(**fields)


BAD_CHAINS = [  # (what is wrong, batch factory, kind, message)
    ("4-D obs", lambda: _batch(obs=torch.zeros(2, 4, 1, 1, dtype=torch.long)), "mixture-gated-categorical",
     r"takes \(batch, time\) integer token ids, got torch.int64 observations of shape \(2, 4, 1, 1\)"),
    ("3-D obs to a token VMT", lambda: _batch(obs=torch.zeros(2, 4, 5)), "mixture-gated-categorical",
     r"got torch.float64 observations of shape \(2, 4, 5\)"),
    ("2-D obs to a vector VMT", lambda: _batch(obs=torch.zeros(2, 4)), "mixture-linear-gaussian",
     r"\(2, 4\)"),
    ("short start", lambda: _batch(start=torch.tensor([0])), "mixture-gated-categorical",
     r"start must have shape \(2,\), got \(1,\)"),
    ("end past the window", lambda: _batch(end=torch.tensor([4, 5])), "mixture-gated-categorical",
     r"start/end must lie in \[0, 4\]"),
    ("empty row", lambda: _batch(start=torch.tensor([0, 3]), end=torch.tensor([4, 3])),
     "mixture-gated-categorical", r"row 1 is empty"),
    ("x0 of the wrong size", lambda: _batch(x0=torch.zeros(2, STATE + 1), carried=torch.tensor([True, False])),
     "mixture-gated-categorical", rf"x0 must be \(2, {STATE}\), got \(2, {STATE + 1}\)"),
    ("carried without x0", lambda: _batch(carried=torch.tensor([True, False])), "mixture-gated-categorical",
     "rows are marked carried but x0 is missing"),
    ("vectors of the wrong size", lambda: _batch(obs=torch.zeros(2, 4, OBS + 1)), "mixture-linear-gaussian",
     rf"observations have dimension {OBS + 1}, the model expects {OBS}"),
]


@pytest.mark.parametrize(("what", "make_batch", "kind", "message"), BAD_CHAINS, ids=[b[0] for b in BAD_CHAINS])
def test_bad_chains_are_refused_by_name(what, make_batch, kind, message, float64):
    vmt = make_vmt(kind)
    with pytest.raises(ValueError, match=message):
        elbo_terms(vmt, make_batch())


# -- sample against log_prob ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixture-gated-categorical", "flow-flow-bernoulli"])
def test_prior_sample_agrees_with_log_prob(kind, float64):
    torch.manual_seed(1)
    ratio_check(make_vmt(kind).prior.distribution())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_transition_sample_agrees_with_log_prob(kind, float64):
    vmt = make_vmt(kind)
    torch.manual_seed(2)
    ratio_check(vmt.transition.distribution(torch.tensor([0.3, -0.7])))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("carried", [False, True])
def test_guide_sample_agrees_with_log_prob(kind, carried, float64):
    """The guide's conditional at the first position: ``q(x_1 | h_1, T)``, or a step out of a
    carried ``x0``."""
    vmt = make_vmt(kind)
    batch = ChainBatch(obs=observations(vmt, (1, 1)), start=torch.zeros(1, dtype=torch.long),
                       end=torch.ones(1, dtype=torch.long), features=torch.randn(1, 1, FEATURE))
    if carried:
        batch = batch.with_(x0=torch.tensor([[0.5, -0.2]]), carried=torch.tensor([True]))
    guide = GuideChain(vmt.guide_net, vmt.guide_context(batch), batch)
    torch.manual_seed(3)
    with torch.no_grad():
        x = guide.sample((20000,))  # (draw, 1, 1, state)
        # the position's conditional does not depend on the path at the first position
        d = guide.position_distribution(x[:1])  # batch (1, 1, 1)
        log_d = d.log_prob(x)[:, 0, 0]  # (draw,)
        assert torch.allclose(log_d, guide.log_prob(x)[:, 0], atol=1e-12)
    flat = x[:, 0, 0]  # (draw, state)
    reference = torch.distributions.MultivariateNormal(flat.mean(0), 0.8**2 * torch.cov(flat.T))
    w = (reference.log_prob(flat) - log_d).exp()
    se = w.std() / len(w) ** 0.5
    assert (w.mean() - 1).abs() < 5 * se and se < 0.05, (float(w.mean()), float(se))


def test_token_emission_sample_agrees_with_log_prob(float64):
    vmt = make_vmt("mixture-gated-categorical")
    x = torch.tensor([0.4, -1.1])
    torch.manual_seed(4)
    with torch.no_grad():
        draws = vmt.emission.distribution(x).sample((20000,))  # (draw,)
        ids = torch.arange(vmt.config.obs_dim)
        probs = vmt.emission.log_prob(x, ids).exp()  # (vocab,)
    counts = torch.bincount(draws, minlength=vmt.config.obs_dim).double()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    assert multinomial_goodness_of_fit(probs, counts) > 1e-3


@pytest.mark.parametrize("kind", ["mixture-linear-gaussian", "flow-flow-bernoulli"])
def test_vector_emission_moments_agree_with_log_prob(kind, float64):
    """Mean and variance of the draws against those of the distribution whose ``log_prob``
    the ELBO uses (and that ``log_prob`` is that distribution's)."""
    vmt = make_vmt(kind)
    x = torch.tensor([0.4, -1.1])
    torch.manual_seed(5)
    with torch.no_grad():
        d = vmt.emission.distribution(x)
        y = d.sample((20000,))  # (draw, obs)
        assert torch.allclose(vmt.emission.log_prob(x, y), d.log_prob(y), atol=1e-12)
    n = y.shape[0]
    mean_se = (d.variance / n).sqrt()
    assert bool(((y.mean(0) - d.mean).abs() < 5 * mean_se).all())
    fourth = ((y - d.mean) ** 4).mean(0)
    var_se = ((fourth - d.variance**2) / n).sqrt()
    assert bool(((y.var(0) - d.variance).abs() < 5 * var_se).all())
