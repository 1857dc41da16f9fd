"""The full-covariance guide step (``guide="full"``) and the cosine learning-rate decay."""

import math

import pytest
import torch

from vmt.inference.train import TrainConfig
from vmt.models import VMTConfig
from vmt.models.guide import GuideNet


def nets():
    torch.manual_seed(0)
    config = VMTConfig(state_dim=4, obs_dim=3, feature_dim=6, guide_hidden=8, emission="gaussian")
    diagonal = GuideNet(config).double()
    full = GuideNet(VMTConfig(**{**config.to_dict(), "guide": "full"})).double()
    full.load_state_dict(diagonal.state_dict(), strict=False)
    return diagonal, full


def test_the_full_step_starts_as_the_diagonal_one():
    diagonal, full = nets()
    assert diagonal.scale_tril(torch.ones(4), torch.ones(8)) is None
    x_prev, ctx = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    params = full.step_params(x_prev, ctx)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(full.distribution(*params).log_prob(x),
                               diagonal.distribution(*diagonal.step_params(x_prev, ctx)).log_prob(x))


def test_scale_tril_is_a_cholesky_factor_with_the_given_diagonal():
    _, full = nets()
    torch.nn.init.normal_(full.tril_head.weight)
    scale = torch.rand(2, 3, 4, dtype=torch.float64) + 0.1
    combined = torch.randn(2, 3, 8, dtype=torch.float64)
    tril = full.scale_tril(scale, combined)
    assert tril.shape == (2, 3, 4, 4)
    torch.testing.assert_close(tril.diagonal(dim1=-2, dim2=-1), scale)
    assert bool((tril.triu(1) == 0).all()) and bool((tril.tril(-1) != 0).any())
    cov = full.distribution(torch.zeros_like(scale), scale, combined).covariance_matrix
    torch.testing.assert_close(cov, tril @ tril.transpose(-1, -2))
    with pytest.raises(ValueError, match=r"scale must be \(\.\.\., 4\).*got \(2, 3\) and \(2, 8\)"):
        full.scale_tril(scale[..., 0], combined[:, 0])


def test_cosine_learning_rate_decay():
    assert TrainConfig(learning_rate=0.01).learning_rate_at(500) == 0.01
    c = TrainConfig(learning_rate=0.01, lr_decay_steps=100, lr_final_fraction=0.1)
    assert c.learning_rate_at(0) == pytest.approx(0.01)
    assert c.learning_rate_at(50) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert c.learning_rate_at(100) == pytest.approx(0.001) == c.learning_rate_at(1000)
    assert all(c.learning_rate_at(k + 1) <= c.learning_rate_at(k) for k in range(120))
    with pytest.raises(ValueError, match="lr_final_fraction must lie in"):
        TrainConfig(lr_final_fraction=0.0)
    with pytest.raises(ValueError, match="lr_decay_steps must be >= 0"):
        TrainConfig(lr_decay_steps=-1)
    assert not math.isnan(c.learning_rate_at(10**9))
