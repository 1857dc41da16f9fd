"""Bad input gets a clear error that names what is wrong (issue checklist, one test each)."""

import json

import pytest
import torch

from vmt.checkpoint import load_checkpoint, save_checkpoint
from vmt.data.corpus import CharTokenizer, tokenize
from vmt.inference.elbo import elbo_terms
from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig


def tiny(**kw):
    return VariationalMarkovTransformer(VMTConfig(state_dim=3, obs_dim=7, feature_dim=4, guide_hidden=8,
                                                  transition_hidden=8, **kw))


def batch(obs=None, features=None):
    obs = torch.randint(0, 7, (2, 5)) if obs is None else obs
    features = torch.randn(2, 5, 4) if features is None else features
    return ChainBatch(obs=obs, start=torch.zeros(2, dtype=torch.long), end=torch.tensor([5, 4]), features=features)


@pytest.mark.parametrize("texts", [[""], ["a"], ["", "b"]])
def test_empty_or_one_token_text(texts):
    with pytest.raises(ValueError, match="2 or more tokens"):
        tokenize(texts, CharTokenizer(), "bad")


def test_token_ids_outside_the_emission_vocabulary():
    obs = torch.randint(0, 7, (2, 5))
    obs[1, 2] = 9
    with pytest.raises(ValueError, match="tokenizer and the emission vocabulary do not match"):
        elbo_terms(tiny(), batch(obs=obs))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features(bad):
    f = torch.randn(2, 5, 4)
    f[1, 3, 0] = bad
    with pytest.raises(ValueError, match="source row 1, position 3"):
        elbo_terms(tiny(), batch(features=f))


def test_feature_dimension_mismatch():
    with pytest.raises(ValueError, match=r"features must be \(source, time, 4\)"):
        elbo_terms(tiny(), batch(features=torch.randn(2, 5, 6)).with_(features=torch.randn(2, 5, 6)))


def test_checkpoint_from_an_incompatible_config(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    meta["vmt_config"]["state_dim"] = 5
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incompatible config"):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_checkpoint_files(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt checkpoint file"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "checkpoint.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="not a vmt checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    vmt = tiny(reverse=True)
    save_checkpoint(tmp_path / "ck", vmt)
    again = load_checkpoint(tmp_path / "ck").vmt
    assert again.config == vmt.config
    for k, v in vmt.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


@pytest.mark.parametrize("field,value", [("state_dim", 0), ("emission", "poisson"), ("min_scale", 0.0)])
def test_config_values_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        VMTConfig(**{field: value})


def test_empty_rows_and_reverse_parts_missing():
    b = batch()
    with pytest.raises(ValueError, match="row 1 is empty"):
        b.with_(end=torch.tensor([5, 0])).validate()
    with pytest.raises(ValueError, match="no reverse parts"):
        elbo_terms(tiny(), b, direction="reverse")
