import numpy as np
import pytest
import torch

from vmt.mep import (
    MEPConfig,
    MEPModel,
    NGramBase,
    SMEPModel,
    TableBase,
    gmep_model,
    higher_order_source,
    markov_source,
    pairwise_source,
    windows_from_sequences,
)

# Population fits run to a gradient of 1e-12 so that identities hold far below 1e-8.
TOL = 1e-12


def true_log_probs(src, ctx):
    r = src.order
    idx = np.ravel_multi_index(tuple(ctx[:, ctx.shape[1] - r :].T), (src.vocab_size,) * r)
    return np.log(src.cond.reshape(-1, src.vocab_size)[idx])


def population_kls(src, model, base):
    """KL(truth||model), KL(truth||base), KL(model||base), exact over stationary contexts."""
    ctx, w = src.population(model.context_length)
    lt, lm, lb = true_log_probs(src, ctx), model.next_log_probs(ctx), base.log_probs(ctx)
    pt, pm = np.exp(lt), np.exp(lm)
    return (float((w[:, None] * pt * (lt - lm)).sum()), float((w[:, None] * pt * (lt - lb)).sum()),
            float((w[:, None] * pm * (lm - lb)).sum()))


def fit_population(src, window, distances, **cfg):
    base = TableBase(src.truncated(window))
    model = MEPModel(base, MEPConfig(distances=distances, prior_variance=None, tol=TOL, **cfg))
    windows, weights = src.population(model.context_length + 1)
    result = model.fit(windows, weights)
    return model, base, result


def test_null_case_source_within_window_gives_zero_multipliers():
    src = markov_source(4, 2, np.random.default_rng(0))
    model, base, result = fit_population(src, 2, (3, 4))
    # The gradient at λ = 0 is zero up to rounding (the base is the exact conditional).
    assert result.converged and float(model.params.abs().max()) <= 1e-10
    ctx, _ = src.population(4)
    np.testing.assert_allclose(model.next_log_probs(ctx), base.log_probs(ctx), atol=1e-10)


def test_gmep_recovers_pairwise_source_exactly():
    src, h, J = pairwise_source(4, 3, np.random.default_rng(1))
    model = gmep_model(4, 3, prior_variance=None, tol=TOL)
    windows, weights = src.population(4)
    model.fit(windows, weights)
    ctx, w = src.population(3)
    lt, lm = true_log_probs(src, ctx), model.next_log_probs(ctx)
    kl = float((w[:, None] * np.exp(lt) * (lt - lm)).sum())
    assert kl <= 1e-10  # acceptance bound
    # couplings equal the truth up to the gauge λ_d(a, b) + c_d(a) + g_d(b) (c_d absorbed by
    # log Z, g_d by the bias), which double centring removes; 1e-5 from a KL of 1e-10+.
    lam = model.couplings.numpy()  # (distance, a, b) for distances 1..3

    def centred(x):
        x = x - x.mean(-1, keepdims=True)
        return x - x.mean(-2, keepdims=True)

    np.testing.assert_allclose(centred(lam), centred(J), atol=1e-5)


@pytest.mark.parametrize("seed", [2, 3])
def test_mep_recovers_at_least_half_of_truncation_loss_on_pairwise_source(seed):
    src = pairwise_source(4, 3, np.random.default_rng(seed))[0]
    model, base, _ = fit_population(src, 1, (2, 3))
    kl_mep, kl_base, _ = population_kls(src, model, base)
    assert kl_base == pytest.approx(src.truncation_loss(1), abs=1e-12)
    assert 1 - kl_mep / kl_base >= 0.5


@pytest.mark.parametrize("make", [
    lambda rng: markov_source(4, 3, rng),
    lambda rng: pairwise_source(4, 3, rng)[0],
    lambda rng: higher_order_source(4, 3, rng),
])
@pytest.mark.parametrize("top_k", [None, 2])
def test_never_worse_and_pythagorean_identity(make, top_k):
    src = make(np.random.default_rng(4))
    model, base, result = fit_population(src, 1, (2, 3), top_k=top_k)
    assert result.converged
    kl_mep, kl_base, kl_mb = population_kls(src, model, base)
    assert kl_mep <= kl_base + 1e-12
    # KL(truth||base) = KL(truth||mep) + KL(mep||base): exact at the constrained optimum.
    assert kl_base == pytest.approx(kl_mep + kl_mb, abs=1e-8)


def test_next_log_probs_match_the_formula_by_brute_force():
    rng = np.random.default_rng(5)
    src = pairwise_source(3, 3, rng)[0]
    model, base, _ = fit_population(src, 1, (2, 3))
    lam = model.couplings.numpy()
    ctx = np.array([[2, 0, 1]])  # x_{n-3}, x_{n-2}, x_{n-1}
    logits = base.log_probs(ctx)[0] + lam[0][0] + lam[1][2]  # d=2 -> x_{n-2}=0, d=3 -> 2
    expected = logits - np.log(np.exp(logits).sum())
    np.testing.assert_allclose(model.next_log_probs(ctx)[0], expected, atol=1e-12)


def test_top_k_keeps_the_base_shape_outside_the_candidates():
    src = higher_order_source(5, 2, np.random.default_rng(6))
    model, base, _ = fit_population(src, 1, (2,), top_k=2)
    ctx, _ = src.population(2)
    lm, lb = model.next_log_probs(ctx), base.log_probs(ctx)
    np.testing.assert_allclose(np.exp(lm).sum(1), 1.0, atol=1e-12)
    order = np.argsort(-lb, axis=1, kind="stable")
    rest = order[:, 2:]
    diff = np.take_along_axis(lm - lb, rest, 1)
    np.testing.assert_allclose(diff, diff[:, :1] * np.ones_like(diff), atol=1e-12)


def test_finite_data_fit_with_data_scaled_prior():
    rng = np.random.default_rng(7)
    src = pairwise_source(4, 3, rng, scale=1.5)[0]
    train = src.sample(20, 500, rng)
    test = src.sample(20, 500, rng)
    base = NGramBase(train, 4, 1)
    model = MEPModel(base, MEPConfig(distances=(2, 3), prior_variance=1.0))
    w_train = windows_from_sequences(train, 4)
    result = model.fit(w_train)
    assert result.converged
    # the penalty is 1/(prior_variance · N) per row: the stationarity condition says so
    assert result.max_violation == pytest.approx(
        float(model.params.abs().max()) / len(w_train), rel=1e-3)
    w_test = windows_from_sequences(test, 4)
    base_nll = -np.mean(base.log_probs(w_test[:, :-1])[np.arange(len(w_test)), w_test[:, -1]])
    assert -model.log_prob(w_test).mean() < base_nll


def test_smep_shares_couplings_and_handles_both_directions():
    rng = np.random.default_rng(8)
    src = pairwise_source(3, 2, rng)[0]
    cfg = MEPConfig(distances=(2,), prior_variance=None, tol=TOL)
    smep = SMEPModel(TableBase(src.truncated(1)), TableBase(src.backward_truncated(1)), cfg)
    windows, weights = src.population(3)
    result = smep.fit(windows, weights)
    assert result.converged
    assert smep.forward.params is smep.backward.params
    fwd, bwd = smep.log_prob(windows)
    base_f = smep.forward_base.log_probs(windows[:, :-1])[np.arange(len(windows)), windows[:, -1]]
    rev = windows[:, ::-1]
    base_b = smep.backward_base.log_probs(rev[:, :-1])[np.arange(len(rev)), rev[:, -1]]
    # jointly never worse than the two bases (λ = 0 is feasible for the shared fit)
    assert -(weights * (fwd + bwd)).sum() <= -(weights * (base_f + base_b)).sum() + 1e-12
    # backward conditional by the formula: coupling indexed J(x_n, x_{n+d})
    J = smep.couplings.numpy()[0]
    ctx = np.array([[2, 1]])  # reversed: x_{n+2}=2, x_{n+1}=1
    logits = smep.backward_base.log_probs(ctx)[0] + J[:, 2]
    np.testing.assert_allclose(smep.backward_next_log_probs(ctx)[0],
                               logits - np.log(np.exp(logits).sum()), atol=1e-12)


def test_smep_null_case():
    src = markov_source(3, 1, np.random.default_rng(9))
    cfg = MEPConfig(distances=(2, 3), prior_variance=None, tol=TOL)
    smep = SMEPModel(TableBase(src.truncated(1)), TableBase(src.backward_truncated(1)), cfg)
    windows, weights = src.population(4)
    smep.fit(windows, weights)
    # a first-order chain is first-order in both directions: nothing to add
    assert float(smep.couplings.abs().max()) <= 1e-10


def test_bad_inputs():
    src = markov_source(3, 2, np.random.default_rng(10))
    base = TableBase(src.truncated(1))
    model = MEPModel(base, MEPConfig(distances=(2, 3)))
    with pytest.raises(ValueError, match=r"windows must be \(row, 4\)"):
        model.fit(np.zeros((5, 3), dtype=int))
    with pytest.raises(ValueError, match="tokens must lie"):
        model.fit(np.full((5, 4), 7))
    with pytest.raises(ValueError, match="distinct"):
        MEPConfig(distances=(2, 2))
    with pytest.raises(ValueError, match="straddle"):
        MEPModel(TableBase(src.truncated(2)), MEPConfig(distances=(2, 3)))
    with pytest.raises(ValueError, match="prior_variance"):
        MEPConfig(distances=(2,), prior_variance=0.0)
    with pytest.raises(ValueError, match="zero"):
        # a base giving zero probability to an observed token
        table = src.truncated(1).copy()
        table[0] = [1.0, 0.0, 0.0]
        MEPModel(TableBase(table), MEPConfig(distances=(2,))).fit(np.array([[1, 0, 1]]))


def test_copy_similarity_features_by_hand():
    from vmt.mep import copy_similarity_features

    cand = np.array([[5, 7, -1]])
    far = np.array([[7, 7, 5, -1]])  # distance columns; -1 = before the document start
    emb = torch.tensor([[1.0, 0.0]] * 5 + [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    index, value, n = copy_similarity_features(cand, far, [[0, 1], [2, 3]], emb)
    assert n == 4 and index.shape == (1, 3, 4)
    np.testing.assert_array_equal(index[0, 0], [0, 1, 2, 3])
    # copy: token 5 appears once in group 1 (of 2 columns); token 7 twice in group 0
    np.testing.assert_allclose(value[0, :, 0], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(value[0, :, 1], [0.5, 0.0, 0.0])
    # cosine: e5 = (1,0), e7 = (0.6,0.8); group 0 = (7,7), group 1 = (5, missing)
    np.testing.assert_allclose(value[0, :, 2], [0.6, 1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(value[0, :, 3], [0.5, 0.3, 0.0], atol=1e-7)
