"""Predictive scoring from a read state: the particle filter against the exact Gaussian
predictive of a linear-Gaussian model, and the categorical one-step identities."""

import math

import pytest
import torch

from vmt.inference.predictive import filter_continuation, next_token_probs
from vmt.models import VMTConfig
from vmt.models.lgssm import example_ssm
from vmt.models.oracles import linear_gaussian_vmt
from vmt.models.vmt import VariationalMarkovTransformer


def exact_log_predictive(ssm, x0: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``log p(y_{1:m} | x_0)`` of a linear-Gaussian model, by the joint Gaussian of the
    observations (built from the moments directly; no filtering)."""
    m = ys.shape[0]
    A, C = ssm.A, ssm.C
    means, covs, mu, P = [], [], x0, torch.zeros_like(ssm.Q)
    for _ in range(m):
        mu, P = A @ mu + ssm.b, A @ P @ A.T + ssm.Q
        means.append(mu)
        covs.append(P)
    obs = C.shape[0]
    cov = torch.zeros(m * obs, m * obs, dtype=ys.dtype)
    for i in range(m):
        for j in range(i, m):
            cross = torch.linalg.matrix_power(A, j - i) @ covs[i]  # Cov(x_j, x_i)
            block = C @ cross @ C.T + (ssm.R if i == j else 0)
            cov[j * obs:(j + 1) * obs, i * obs:(i + 1) * obs] = block
            cov[i * obs:(i + 1) * obs, j * obs:(j + 1) * obs] = block.T
    mean = torch.cat([C @ mu_j + ssm.d for mu_j in means])
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(ys.reshape(-1))


def test_particle_filter_matches_the_exact_gaussian_predictive():
    ssm = example_ssm(torch.float64)
    vmt = linear_gaussian_vmt(ssm).double()
    starts = torch.tensor([[0.5, -1.0], [-0.3, 0.8]], dtype=torch.float64)
    _, ys = ssm.simulate(4, 1, torch.Generator().manual_seed(3))
    ys = ys[0]
    exact = torch.stack([exact_log_predictive(ssm, x0, ys) for x0 in starts])
    expected = float(exact.logsumexp(0) - math.log(2))  # the rows are an equal mixture
    state = starts.repeat_interleave(4000, dim=0)
    got = filter_continuation(vmt, state, ys, generator=torch.Generator().manual_seed(0))
    # 8000 particles over 4 two-dimensional steps: the log estimate's spread over seeds is
    # about 0.02 nats here; 0.1 allows five of those and still catches a missing term (a
    # dropped transition or emission term moves it by more than 1 nat)
    assert abs(got.log_prob - expected) < 0.1
    assert got.particles.shape == state.shape
    assert got.greedy is None
    # the first token alone is a plain Monte Carlo average: same check, one step
    first = filter_continuation(vmt, state, ys[:1], generator=torch.Generator().manual_seed(1))
    exact1 = torch.stack([exact_log_predictive(ssm, x0, ys[:1]) for x0 in starts])
    assert abs(first.log_prob - float(exact1.logsumexp(0) - math.log(2))) < 0.1


def test_filtered_particles_follow_the_kalman_filter_mean():
    ssm = example_ssm(torch.float64)
    vmt = linear_gaussian_vmt(ssm).double()
    x0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, ys = ssm.simulate(3, 1, torch.Generator().manual_seed(5))
    ys = ys[0]
    out = filter_continuation(vmt, x0.expand(20000, -1), ys, generator=torch.Generator().manual_seed(2))
    mu, P = x0, torch.zeros(2, 2, dtype=torch.float64)  # Kalman filter from a known x0
    for y in ys:
        mu, P = ssm.A @ mu + ssm.b, ssm.A @ P @ ssm.A.T + ssm.Q
        S = ssm.C @ P @ ssm.C.T + ssm.R
        K = P @ ssm.C.T @ torch.linalg.inv(S)
        mu, P = mu + K @ (y - ssm.C @ mu - ssm.d), P - K @ ssm.C @ P
    # standard error of a mean of 20000 draws with variance <= 0.3 is 0.004 (more after
    # resampling's degeneracy): 0.03 is several of those
    torch.testing.assert_close(out.particles.mean(0), mu, rtol=0, atol=0.03)


def small_categorical_vmt() -> VariationalMarkovTransformer:
    config = VMTConfig(state_dim=3, obs_dim=7, feature_dim=4, guide_hidden=8,
                       transition_hidden=8, emission="categorical", reverse=True)
    return VariationalMarkovTransformer(config).double()


def test_one_categorical_step_is_the_next_token_distribution():
    vmt = small_categorical_vmt()
    state = torch.randn(64, 3, dtype=torch.float64)
    torch.manual_seed(11)
    probs = next_token_probs(vmt, state)
    assert probs.shape == (7,)
    # a probability vector up to float64 rounding of a mean of 64 softmaxes
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    for y in range(7):
        torch.manual_seed(11)  # the same transition draws as next_token_probs
        out = filter_continuation(vmt, state, torch.tensor([y]))
        # the same 64 draws averaged in log space instead of probability space: 1e-10
        assert abs(out.log_prob - math.log(float(probs[y]))) < 1e-10
        assert int(out.greedy[0]) == int(probs.argmax())


def test_reverse_direction_uses_the_reverse_transition():
    vmt = small_categorical_vmt()
    state = torch.randn(16, 3, dtype=torch.float64)
    torch.manual_seed(4)
    fwd = filter_continuation(vmt, state, torch.tensor([1, 2])).log_probs
    torch.manual_seed(4)
    rev = filter_continuation(vmt, state, torch.tensor([1, 2]), direction="reverse").log_probs
    # independent random networks for p and p_r: the scores differ by far more than rounding
    assert (fwd - rev).abs().max() > 1e-6


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.tensor([], dtype=torch.long), "empty"),
        (torch.tensor([7]), r"\[0, 7\)"),
        (torch.tensor([[1.0]]), "int64"),
    ],
)
def test_bad_continuations_are_refused(tokens, match):
    with pytest.raises(ValueError, match=match):
        filter_continuation(small_categorical_vmt(), torch.zeros(2, 3, dtype=torch.float64), tokens)


def test_bad_state_is_refused():
    with pytest.raises(ValueError, match=r"\(samples, 3\)"):
        filter_continuation(small_categorical_vmt(), torch.zeros(2, 4), torch.tensor([1]))


def test_token_penalty_spreads_unk_over_the_merged_ids():
    vmt = small_categorical_vmt()
    state = torch.randn(32, 3, dtype=torch.float64)
    penalty = torch.zeros(7, dtype=torch.float64)
    penalty[0] = math.log(1000.0)  # <unk> stands for 1000 merged ids
    torch.manual_seed(2)
    plain = filter_continuation(vmt, state, torch.tensor([0, 3]))
    torch.manual_seed(2)
    fair = filter_continuation(vmt, state, torch.tensor([0, 3]), token_penalty=penalty)
    # same draws: only the <unk> step moves, by exactly log(1000) (float64 rounding)
    torch.testing.assert_close(plain.log_probs - fair.log_probs,
                               torch.tensor([math.log(1000.0), 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # 1/1000 of <unk>'s mass can no longer be the most probable token
    assert int(fair.greedy[0]) != 0
    with pytest.raises(ValueError, match="token_penalty"):
        filter_continuation(vmt, state, torch.tensor([1]), token_penalty=torch.zeros(6))


def test_token_family_scores_with_the_slot_integrated_out():
    """Nearly noiseless memory and slot: the continuation's probability is the product of the
    next-token heads along the deterministic memory path, which the filter must give with 4
    particles (a bootstrap weight by the sampled slot's responsibility would be 0 or 1 per
    particle and resolve each probability only to 1/4)."""
    from vmt.models.vmt import token_rnn_vmt

    torch.manual_seed(3)
    vmt = token_rnn_vmt(vocab=7, memory_dim=5, token_dim=3, hidden=8, max_window=16).double()
    mixture = vmt.emission._shared.module
    mixture.slot_scale = 1e-5
    with torch.no_grad():
        vmt.transition.to_scale.bias.fill_(-30.0)  # memory noise at its floor, 1e-3
        vmt.transition.min_scale = 1e-7
    x = torch.randn(1, 8, dtype=torch.float64)
    ys = torch.tensor([2, 5, 0, 6, 6, 1])
    exact, state = 0.0, x
    with torch.no_grad():
        for y in ys:  # the deterministic path: m' = GRU(m, u), u' = e_y
            m, _ = vmt.transition.memory_params(state)
            exact += float(mixture.head_log_probs(m)[0, y])
            state = torch.cat([m, mixture.token_embedding(y)[None]], -1)
        first = mixture.head_log_probs(vmt.transition.memory_params(x)[0])[0].exp()
    out = filter_continuation(vmt, x.expand(4, -1), ys)
    assert out.log_prob == pytest.approx(exact, abs=1e-4)
    assert torch.allclose(out.particles[:, 5:], mixture.token_embedding(ys[-1]).expand(4, -1), atol=1e-3)
    assert torch.allclose(next_token_probs(vmt, x.expand(4, -1)), first, atol=1e-6)
