"""The top-level API: every exported name resolves, ``import vmt`` stays light."""

import subprocess
import sys

import pytest

import vmt
import vmt.inference


@pytest.mark.parametrize("name", sorted(set(vmt.__all__) - {"__version__"}))
def test_every_top_level_name_resolves_to_its_definition(name):
    value = getattr(vmt, name)
    module = vmt._EXPORTS[name]
    assert value is getattr(__import__(module, fromlist=[name]), name)
    assert name in dir(vmt)


@pytest.mark.parametrize("name", vmt.inference.__all__)
def test_every_inference_name_resolves(name):
    value = getattr(vmt.inference, name)
    assert callable(value) and value.__name__ == name


def test_the_main_entry_points_are_exported():
    expected = {"VariationalMarkovTransformer", "VMTConfig", "fit", "TrainConfig", "evaluate", "read",
                "ReadConfig", "posterior_states", "write", "write_prequel", "sample_unconditional",
                "SamplingConfig", "Conversation", "save_checkpoint", "load_checkpoint"}
    assert expected <= set(vmt.__all__)
    assert {"fit", "read", "write", "posterior_states", "Conversation"} <= set(vmt.inference.__all__)
    # the submodule of the same name stays a module in vmt.inference; the function is top level
    import vmt.inference.evaluate as module

    assert vmt.evaluate is module.evaluate and "evaluate" not in vmt.inference.__all__


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        vmt.no_such_thing  # noqa: B018
    with pytest.raises(AttributeError, match="no_such_thing"):
        vmt.inference.no_such_thing  # noqa: B018


def test_import_vmt_does_not_import_torch():
    code = "import sys, vmt; print('torch' in sys.modules, 'pyro' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_import_vmt_models_leaves_pyro_settings_alone():
    """Only constructing a part turns on ``module_local_params`` (vmt.models.pyro_module)."""
    code = (
        "import pyro; pyro.settings.set(module_local_params=False)\n"
        "import vmt.models, vmt.inference\n"
        "print(pyro.settings.get('module_local_params'))\n"
        "vmt.models.VariationalMarkovTransformer(vmt.models.VMTConfig(obs_dim=3, feature_dim=4))\n"
        "print(pyro.settings.get('module_local_params'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
