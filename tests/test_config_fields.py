"""One ``from_dict`` for every configuration; factories refuse kinds they do not know."""

import pytest

from vmt.config_fields import config_from_dict, known_fields
from vmt.experiment import ModelPreset, Schedule
from vmt.inference.train import TrainConfig
from vmt.models.config import VMTConfig
from vmt.models.emission import build_emission
from vmt.models.prior import build_prior
from vmt.models.transition import build_transition


@pytest.mark.parametrize(
    "read, data, message",
    [
        (VMTConfig.from_dict, {"state_dim": 4, "colour": 1, "depth": 2}, r"unknown VMTConfig fields \['colour', 'depth'\]"),
        (TrainConfig.from_dict, {"steps": 3, "lr": 0.1}, r"unknown TrainConfig fields \['lr'\]"),
        (ModelPreset.from_dict, {"colour": 1}, r"unknown preset fields \['colour'\]"),
        (ModelPreset.from_dict, {"encoder": {"depth": 2}}, r"unknown encoder fields \['depth'\]"),
        (Schedule.from_dict, {"epochs": 2}, r"unknown schedule fields \['epochs'\]"),
        (Schedule.from_dict, {"train": {"lr": 0.1}}, r"unknown TrainConfig fields \['lr'\]"),
        (VMTConfig.from_dict, [1, 2], r"VMTConfig must be a JSON object"),
    ],
)
def test_every_from_dict_names_unknown_keys(read, data, message):
    with pytest.raises(ValueError, match=message):
        read(data)


def test_from_dict_round_trips():
    config = VMTConfig(state_dim=5, obs_dim=7, feature_dim=3)
    assert VMTConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({"steps": 3}) == TrainConfig(steps=3)
    schedule = Schedule.from_dict({"train": {"steps": 3}, "eval_window": 64, "description": "x"})
    assert schedule == Schedule(train=TrainConfig(steps=3), eval_window=64)
    assert ModelPreset.from_dict({"vmt": {"state_dim": 8}}).vmt == {"state_dim": 8}


def test_the_helper_reads_nested_configs_and_drops_ignored_keys():
    got = config_from_dict(Schedule, {"train": {"steps": 2}, "note": 1}, nested={"train": TrainConfig.from_dict},
                           ignore=("note",))
    assert got.train.steps == 2
    assert known_fields(TrainConfig, {"steps": 1}, "t") == {"steps": 1}


@pytest.mark.parametrize(
    "build, args",
    [
        (build_prior, ("mixtures", 4, 2, 1, 8)),
        (build_transition, ("gru", 4, 8, 1, 1e-3)),
        (build_emission, ("poisson", 4, 5, 8)),
    ],
)
def test_factories_refuse_unknown_kinds(build, args):
    with pytest.raises(ValueError, match=f"unknown .* kind '{args[0]}'"):
        build(*args)
