"""The lean sampling loop of the Gaussian guide equals the step-by-step loop: the same path
from the same seed, and the same gradients of any function of it (float64, 1e-10; observed
~1e-15, only rounding differs)."""

import pytest
import torch

from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig
from vmt.models.chain import GuideChain
from vmt.models.lean_loop import lean_loop_applies, lean_rsample

F64 = torch.float64


def maxabs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def _setup():
    config = VMTConfig(state_dim=4, obs_dim=10, feature_dim=6, guide_hidden=8, max_window=20)
    vmt = VariationalMarkovTransformer(config).double()
    with torch.no_grad():  # a non-zero linear skip, so every weight matters
        vmt.guide_net.state_skip.weight.normal_(0, 0.3)
    rows, steps = 5, 12
    features = torch.randn(rows, steps, 6, dtype=F64, requires_grad=True)
    batch = ChainBatch(
        obs=torch.randint(0, 10, (rows, steps)), start=torch.tensor([0, 2, 0, 3, 1]),
        end=torch.tensor([12, 10, 5, 12, 12]), features=features,
        x0=torch.randn(rows, 4, dtype=F64, requires_grad=True),
        carried=torch.tensor([False, True, False, False, True]),
    )
    return vmt, batch


@pytest.mark.parametrize("leading", [(), (3,), "expanded"])
def test_lean_loop_equals_the_stepwise_loop(leading):
    vmt, batch = _setup()
    chain = GuideChain(vmt.guide_net, vmt.guide_context(batch), batch)
    sample_shape = torch.Size(leading) if leading != "expanded" else torch.Size()
    if leading == "expanded":
        chain = chain.expand((2, batch.num_rows))
    inputs = [p for p in vmt.guide_net.parameters()] + [batch.features, batch.x0]
    torch.manual_seed(11)
    lean = chain.rsample(sample_shape)
    torch.manual_seed(11)
    stepwise = chain.rsample_stepwise(sample_shape)
    assert lean.shape == stepwise.shape
    assert maxabs(lean - stepwise) < 1e-10
    weights = torch.randn_like(lean)
    g_lean = torch.autograd.grad((lean * weights).sum(), inputs, retain_graph=True)
    g_step = torch.autograd.grad((stepwise * weights).sum(), inputs)
    for a, b in zip(g_lean, g_step, strict=True):
        assert maxabs(a - b) < 1e-10 * (1 + maxabs(b))


def test_lean_loop_applies_only_to_the_gaussian_guide():
    vmt, batch = _setup()
    assert lean_loop_applies(vmt.guide_net)
    flow = VariationalMarkovTransformer(VMTConfig(state_dim=4, obs_dim=10, feature_dim=6, guide="flow"))
    assert not lean_loop_applies(flow.guide_net)
    chain = GuideChain(flow.guide_net, flow.guide_context(batch.with_(
        features=batch.features.detach().float(), x0=batch.x0.detach().float())), batch)
    with pytest.raises(ValueError, match="GuideNet"):
        lean_rsample(chain)
