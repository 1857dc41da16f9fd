"""Presets and schedules: a path first, then ./models or ./inference, then the shipped ones."""

import json
from pathlib import Path

import pytest

from vmt.experiment import load_json, resolve_config, shipped_configs
from vmt.music_experiment import parse_config

SOURCE = Path(__file__).parents[2] / "src" / "vmt" / "configs"


@pytest.mark.parametrize("folder", ["models", "inference"])
def test_every_source_config_is_shipped_and_parses(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing local: only the shipped files can answer
    names = shipped_configs(folder)
    assert names == sorted(p.stem for p in (SOURCE / folder).glob("*.json")) and names
    for name in names:
        found = resolve_config(name, folder)
        assert found.name == f"{name}.json"
        parse_config(load_json(found), folder)  # text or piano-roll configuration


def test_working_directory_overrides_the_shipped_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    local = tmp_path / "models" / "text-gru.json"
    local.write_text(json.dumps({"encoder": {"kind": "gru", "hidden": 8}}))
    assert resolve_config("text-gru", "models") == local
    assert load_json(resolve_config("text-smollm2", "models"))["encoder"]["kind"] == "lm"


def test_a_json_path_is_used_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "elsewhere" / "demo.json"
    path.parent.mkdir()
    path.write_text("{}")
    assert resolve_config(str(path), "inference") == path


def test_unknown_name_lists_local_and_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "mine.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no inference configuration 'nope' \(known: \['demo', 'jsb-hour', 'mine', 'task-hour', 'token-demo', 'token-hour', 'windows'\]\)"):
        resolve_config("nope", "inference")


def test_unknown_folder_is_a_clear_error():
    with pytest.raises(ValueError, match="configuration folder must be 'models' or 'inference', got 'presets'"):
        resolve_config("demo", "presets")


def test_invalid_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_json(bad)
