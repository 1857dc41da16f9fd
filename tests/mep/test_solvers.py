import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from vmt.mep import (
    CandidateData,
    InfeasibleConstraintsError,
    ZeroProbabilityError,
    check_feasibility,
    fit_conditional,
    ipf,
    marginal_constraints,
    solve_maxent_scipy,
    solve_maxent_torch,
)

SOLVERS = [solve_maxent_scipy, solve_maxent_torch]
FACES = np.arange(1, 7, dtype=float)


def kl(p, q):
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


@pytest.mark.parametrize("solve", SOLVERS)
def test_loaded_die(solve):
    res = solve(FACES[None], [4.5], tol=1e-12)
    # Independent reference: the exponential family p ∝ exp(λx) with λ from a scalar root.
    lam = brentq(lambda t: (FACES * np.exp(t * FACES)).sum() / np.exp(t * FACES).sum() - 4.5,
                 -5, 5, xtol=1e-15)
    ref = np.exp(lam * FACES) / np.exp(lam * FACES).sum()
    # 1e-8 is the acceptance tolerance; both are float64 solutions of a 1-D smooth problem.
    np.testing.assert_allclose(res.probs, ref, atol=1e-8)
    np.testing.assert_allclose(res.multipliers, [lam], atol=1e-8)
    # The published values (5 significant digits) as a sanity check.
    np.testing.assert_allclose(res.probs, [0.05435, 0.07877, 0.11416, 0.16545, 0.23977, 0.34749],
                               atol=1e-5)
    assert res.converged and res.max_violation <= 1e-12 and res.gauge_dim == 0
    assert res.log_partition == pytest.approx(np.log(np.exp(lam * FACES).sum() / 6), abs=1e-10)


@pytest.mark.parametrize("solve", SOLVERS)
def test_discretised_gaussian_from_two_moments(solve):
    x = np.linspace(-5, 5, 201)
    mu, sigma = 0.7, 1.3
    g = np.exp(-((x - mu) ** 2) / (2 * sigma**2))
    g /= g.sum()
    F = np.stack([x, x**2])
    res = solve(F, F @ g, tol=1e-12)
    # The max-ent distribution with the Gaussian's two moments is that discretised Gaussian.
    np.testing.assert_allclose(res.probs, g, atol=1e-8)
    # λ = (μ/σ², −1/(2σ²)); the dual is well conditioned here, so 1e-6 relative is ample.
    np.testing.assert_allclose(res.multipliers, [mu / sigma**2, -1 / (2 * sigma**2)], rtol=1e-6)


def _rand_marg(rng, n):
    return rng.dirichlet(np.ones(n))


def test_product_of_marginals_all_solvers_agree():
    rng = np.random.default_rng(1)
    shape = (2, 3, 4)
    margs = [((i,), _rand_marg(rng, n)) for i, n in enumerate(shape)]
    product = np.einsum("i,j,k->ijk", *[m for _, m in margs])
    F, K = marginal_constraints(shape, margs)
    by_ipf = ipf(np.ones(shape), margs, tol=1e-13)
    by_scipy = solve_maxent_scipy(F, K, tol=1e-12)
    by_torch = solve_maxent_torch(F, K, tol=1e-12)
    # Closed form and agreement at the acceptance tolerance 1e-8 (float64 throughout).
    np.testing.assert_allclose(by_ipf.table, product, atol=1e-8)
    np.testing.assert_allclose(by_scipy.probs, product.ravel(), atol=1e-8)
    np.testing.assert_allclose(by_torch.probs, product.ravel(), atol=1e-8)
    # Each marginal's indicators sum to one, a constant that log Z absorbs: 3 gauge directions.
    assert by_scipy.gauge_dim == 3 and by_torch.gauge_dim == 3
    np.testing.assert_allclose(by_scipy.multipliers, by_torch.multipliers, atol=1e-6)


def _stationary_chain(rng, V):
    P = rng.dirichlet(np.ones(V), size=V)
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()
    return pi, P


def test_markov_chain_from_pair_marginals_in_one_ipf_sweep():
    rng = np.random.default_rng(2)
    V, L = 3, 4
    pi, P = _stationary_chain(rng, V)
    pair = pi[:, None] * P
    margs = [((k, k + 1), pair) for k in range(L - 1)]
    res = ipf(np.ones((V,) * L), margs, tol=1e-12)
    chain = np.einsum("a,ab,bc,cd->abcd", pi, P, P, P)
    assert res.sweeps == 1 and res.converged
    np.testing.assert_allclose(res.table, chain, atol=1e-8)
    F, K = marginal_constraints((V,) * L, margs)
    for solve in SOLVERS:
        out = solve(F, K, tol=1e-11)
        # Shared single-token marginals make the constraints redundant (a gauge).
        assert out.gauge_dim > 0
        np.testing.assert_allclose(out.probs, chain.ravel(), atol=1e-8)


def test_redundant_constraint_gauge_is_fixed_to_minimum_norm():
    F = np.stack([FACES, FACES])  # the same constraint twice
    res = solve_maxent_scipy(F, [4.5, 4.5])
    single = solve_maxent_scipy(FACES[None], [4.5])
    assert res.gauge_dim == 1
    np.testing.assert_allclose(res.probs, single.probs, atol=1e-10)
    # minimum norm splits the multiplier equally between the two copies
    np.testing.assert_allclose(res.multipliers, single.multipliers / 2 * np.ones(2), atol=1e-8)


def test_prior_zeros_stay_zero_and_pythagorean_identity():
    rng = np.random.default_rng(3)
    p0 = rng.dirichlet(np.ones(8))
    p0[2] = 0.0
    F = rng.normal(size=(3, 8))
    q = rng.dirichlet(np.ones(8))
    q[2] = 0.0
    q /= q.sum()
    K = F @ q
    res = solve_maxent_scipy(F, K, prior=p0, tol=1e-12)
    assert res.probs[2] == 0.0
    # KL(q||p0) = KL(q||p*) + KL(p*||p0) for any q meeting the constraints; float64 sums.
    assert kl(q, p0 / p0.sum()) == pytest.approx(kl(q, res.probs) + kl(res.probs, p0 / p0.sum()),
                                                 abs=1e-10)


@pytest.mark.parametrize("solve", SOLVERS)
def test_infeasible_constraints_are_reported(solve):
    with pytest.raises(InfeasibleConstraintsError, match="least total violation"):
        solve(FACES[None], [7.0])
    # consistent-looking but contradictory pair: E[x] = 2 and E[x] = 3
    with pytest.raises(InfeasibleConstraintsError):
        solve(np.stack([FACES, FACES]), [2.0, 3.0])


@pytest.mark.parametrize("solve", SOLVERS)
def test_zero_probability_targets(solve):
    with pytest.raises(ZeroProbabilityError, match="zero probability on 5 state"):
        solve(FACES[None], [6.0])
    res = solve(FACES[None], [6.0], on_boundary="restrict")
    np.testing.assert_array_equal(res.probs, [0, 0, 0, 0, 0, 1])
    reach = check_feasibility(np.eye(3), [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(reach, [True, True, False])


@pytest.mark.parametrize("solve", SOLVERS)
def test_bad_shapes_and_values(solve):
    with pytest.raises(ValueError, match="2 constraint rows"):
        solve(np.ones((2, 6)), [1.0])
    with pytest.raises(ValueError, match="prior has shape"):
        solve(FACES[None], [3.0], prior=np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        solve(np.array([[1.0, np.nan]]), [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        solve(FACES[None], [np.inf])
    with pytest.raises(ValueError, match="2 dimension"):
        solve(FACES, [3.0])
    with pytest.raises(ValueError, match="negative"):
        solve(FACES[None], [3.0], prior=-np.ones(6))


def test_ipf_bad_inputs_and_zero_targets():
    V = 3
    a = np.array([0.5, 0.5, 0.0])
    res = ipf(np.ones((V, V)), [((0,), a), ((1,), np.full(V, 1 / 3))])
    assert np.all(res.table[2] == 0.0) and res.converged
    pair = np.full((V, V), 1 / 9)
    other = np.array([[0.5, 0, 0], [0, 0.25, 0], [0, 0, 0.25]])
    with pytest.raises(InfeasibleConstraintsError, match="disagree"):
        ipf(np.ones((V, V, V)), [((0, 1), pair), ((1, 2), other)])
    with pytest.raises(InfeasibleConstraintsError, match="sums to"):
        ipf(np.ones((V, V)), [((0,), np.ones(V))])
    with pytest.raises(ValueError, match="must have shape"):
        ipf(np.ones((V, V)), [((0,), np.ones(V + 1) / (V + 1))])
    with pytest.raises(ValueError, match="non-finite"):
        ipf(np.ones((V, V)), [((0,), np.array([np.nan, 0.5, 0.5]))])
    prior = np.ones((V, V))
    prior[0] = 0.0
    with pytest.raises(InfeasibleConstraintsError, match="mass where the table has none"):
        ipf(prior, [((0,), np.full(V, 1 / 3))])


def _random_conditional(rng, n=200, k=4, P=6):
    base = torch.log_softmax(torch.as_tensor(rng.normal(size=(n, k))), 1)
    idx = torch.as_tensor(rng.integers(0, P, size=(n, k, 2)))
    val = torch.as_tensor(rng.normal(size=(n, k, 2)))
    tgt = torch.as_tensor(rng.integers(0, k, size=n))
    return CandidateData(base, torch.full((n,), -np.inf), tgt, base[torch.arange(n), tgt],
                         idx, val, P)


def test_conditional_solvers_agree_and_meet_constraints():
    data = _random_conditional(np.random.default_rng(4))
    fits = [fit_conditional(data, method=m, tol=1e-10, l2=1e-3) for m in ("scipy", "torch")]
    adam = fit_conditional(data, method="adam", tol=1e-10, l2=1e-3, epochs=3, batch_size=64)
    for f in fits + [adam]:
        assert f.converged
        # With a penalty the optimum balances violation and l2·θ exactly.
        assert f.max_violation == pytest.approx(1e-3 * float(f.params.abs().max()), rel=1e-4)
    # strictly convex (l2 > 0): unique optimum; 1e-8 from the 1e-10 gradient tolerance.
    torch.testing.assert_close(fits[0].params, fits[1].params, atol=1e-8, rtol=0)
    torch.testing.assert_close(adam.params, fits[0].params, atol=1e-8, rtol=0)


def test_candidate_data_validation():
    data = _random_conditional(np.random.default_rng(5), n=10)
    with pytest.raises(ValueError, match="log_rest must have shape"):
        CandidateData(data.base_logp, torch.zeros(9), data.target, data.target_base_logp,
                      data.feat_index, data.feat_value, 6)
    with pytest.raises(ValueError, match="feat_value contains non-finite"):
        CandidateData(data.base_logp, data.log_rest, data.target, data.target_base_logp,
                      data.feat_index, data.feat_value * np.nan, 6)
    with pytest.raises(ValueError, match="zero"):
        tb = data.target_base_logp.clone()
        tb[0] = -np.inf
        CandidateData(data.base_logp, data.log_rest, data.target, tb, data.feat_index,
                      data.feat_value, 6)
    with pytest.raises(ValueError, match="outside"):
        CandidateData(data.base_logp, data.log_rest, data.target, data.target_base_logp,
                      data.feat_index, data.feat_value, 3)
    with pytest.raises(ValueError, match="method"):
        fit_conditional(data, method="newton")
    with pytest.raises(ValueError, match="l2"):
        fit_conditional(data, l2=-1.0)


def test_the_solvers_module_re_exports_its_three_parts_under_the_same_names():
    import vmt.mep
    from vmt.mep import conditional, joint, proportional_fitting, solvers

    parts = {**{n: joint for n in joint.__all__}, **{n: proportional_fitting for n in proportional_fitting.__all__},
             **{n: conditional for n in conditional.__all__}}
    assert sorted(parts) == sorted(solvers.__all__)
    for name, module in parts.items():
        assert getattr(solvers, name) is getattr(module, name) is getattr(vmt.mep, name)
