"""Every part of a VMT satisfies its protocol (vmt.models.parts); flows share one stack."""

import pytest
import torch

from vmt.encoders.small_readers import GRUReader, TransformerReader
from vmt.models import VariationalMarkovTransformer, VMTConfig
from vmt.models.parts import (
    Emission,
    GaussianTransition,
    GuideStep,
    NextTokenEmission,
    Prior,
    Reader,
    Transition,
)
from vmt.models.reader_spec import FoldedReader

CASES = {
    "gated": dict(transition="gated", prior="mixture", emission="categorical", obs_dim=7),
    "linear": dict(transition="linear", prior="mixture", emission="gaussian", obs_dim=3),
    "flow": dict(transition="flow", prior="flow", emission="bernoulli", obs_dim=5, guide="flow"),
    "token": dict(transition="token", prior="token", emission="token", guide="token", obs_dim=7,
                  token_dim=2),
    "full": dict(transition="gated", prior="mixture", emission="categorical", obs_dim=7, guide="full"),
    "affine": dict(transition="linear", prior="mixture", emission="gaussian", obs_dim=3, guide="affine"),
    "affine-full": dict(transition="linear", prior="mixture", emission="gaussian", obs_dim=3, guide="affine",
                        affine_structure="full"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parts_satisfy_their_protocols(case):
    vmt = VariationalMarkovTransformer(VMTConfig(state_dim=4, feature_dim=6, guide_hidden=8,
                                                 transition_hidden=8, **CASES[case]))
    assert isinstance(vmt.prior, Prior)
    assert isinstance(vmt.transition, Transition)
    assert isinstance(vmt.emission, Emission)
    assert isinstance(vmt.emission, NextTokenEmission) == (case == "token")
    assert isinstance(vmt.transition, GaussianTransition) == (CASES[case]["transition"] in ("gated", "linear"))
    net = vmt.guide_net_for("forward")
    assert isinstance(net, GuideStep)
    if case != "token":  # the token net's context also reads the tokens (tests/models/test_tokens.py)
        # one first state from its own parameters: a distribution over the state, event (state,)
        ctx = net.context(torch.randn(3, 1, 6), torch.ones(3, 1, dtype=torch.long))
        q = net.distribution(*net.first_params(ctx[:, 0]))
        x = q.sample()
        assert x.shape == (3, 4) and q.log_prob(x).shape == (3,)


def test_readers_satisfy_the_reader_protocol():
    readers = [GRUReader("tokens", 6, vocab_size=9), TransformerReader("tokens", 8, vocab_size=9),
               FoldedReader(vocab_size=9, d_model=8, n_heads=2, d_ff=8, n_local=1, n_global=1, segment_length=4)]
    for reader in readers:
        assert isinstance(reader, Reader)
        out = reader(torch.randint(0, 9, (2, 5)), torch.tensor([5, 3]))
        assert out.shape == (2, 5, reader.hidden_size)


def test_the_flow_parts_keep_their_checkpoint_keys():
    config = VMTConfig(state_dim=4, obs_dim=5, feature_dim=6, guide_hidden=8, transition_hidden=8,
                       emission="bernoulli", prior="flow", transition="flow", guide="flow", flow_layers=2)
    keys = set(VariationalMarkovTransformer(config).state_dict())
    for owner, attr in (("prior", "couplings"), ("transition", "couplings"), ("guide_net", "flows")):
        assert {f"{owner}.perm_0", f"{owner}.perm_1"} <= keys
        assert any(k.startswith(f"{owner}.{attr}.1.") for k in keys)
