"""The built wheel works outside the checkout: its CLI runs, its presets resolve, a tiny fit runs.

The wheel is built from a copy of the sources, installed with ``--no-deps`` into a fresh virtual
environment without system site-packages; the dependencies come from the running (locked)
environment through a ``.pth`` file, so the test checks the wheel's contents, not the resolver.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SHIPPED = {folder: sorted(p.stem for p in (ROOT / "src" / "vmt" / "configs" / folder).glob("*.json"))
           for folder in ("models", "inference")}

RESOLVE_ALL = """
import json, sys
import vmt
from vmt.experiment import load_json, resolve_config, shipped_configs
from vmt.music_experiment import parse_config
found = {}
for folder in ("models", "inference"):
    found[folder] = {}
    for name in shipped_configs(folder):
        path = resolve_config(name, folder)
        parse_config(load_json(path), folder)
        found[folder][name] = str(path)
print(json.dumps({"vmt": vmt.__file__, "found": found}))
"""


def run(args, cwd, env, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(python, vmt script, environment, work directory) of a venv holding only the built wheel."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = base / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist),
         str(source)], cwd=base, env=env)
    (wheel,) = dist.glob("variational_markov_transformer-*.whl")

    target = base / "venv"
    venv.create(target, system_site_packages=False, with_pip=False)
    python = target / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         str(wheel)], cwd=base, env=env)
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=base, env=env).strip())
    # The dependencies: this environment's site-packages, after the venv's own (so the wheel's
    # vmt, not this checkout's, is imported). Directories named in a .pth are not scanned for
    # .pth files of their own, so the editable install of the checkout stays out of reach.
    parents = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (purelib / "zz_locked_dependencies.pth").write_text("".join(f"{p}\n" for p in parents))
    work = base / "elsewhere"
    work.mkdir()
    return python, target / "bin" / "vmt", env, work, purelib


@pytest.mark.integration
def test_wheel_cli_help_runs_outside_the_checkout(wheel_env):
    python, vmt, env, work, _ = wheel_env
    out = run([str(vmt), "fit", "--help"], cwd=work, env=env)
    assert "--model" in out and "--schedule" in out


@pytest.mark.integration
def test_wheel_ships_and_resolves_every_preset_and_schedule(wheel_env):
    python, _, env, work, purelib = wheel_env
    report = json.loads(run([str(python), "-c", RESOLVE_ALL], cwd=work, env=env))
    assert Path(report["vmt"]).is_relative_to(purelib)  # the wheel's copy, not the checkout
    for folder, names in SHIPPED.items():
        assert sorted(report["found"][folder]) == names and names
        for path in report["found"][folder].values():
            assert Path(path).is_relative_to(purelib / "vmt" / "configs" / folder)


@pytest.mark.lm
@pytest.mark.integration
def test_wheel_fits_a_tiny_preset_from_another_directory(wheel_env):
    _, vmt, env, work, _ = wheel_env
    (work / "models").mkdir()
    (work / "models" / "tiny.json").write_text(json.dumps({
        "encoder": {"kind": "gru", "hidden": 16, "window": 32},
        "vocab_max_size": 200,
        "vmt": {"state_dim": 4, "prior_components": 2, "transition_hidden": 16, "guide_hidden": 16},
    }))
    (work / "inference").mkdir()
    (work / "inference" / "tiny.json").write_text(json.dumps({
        "max_train_tokens": 600, "max_test_tokens": 150, "eval_window": 32, "eval_particles": 2,
        "train": {"steps": 50, "batch_size": 2, "max_length": 8, "budget": 64, "log_every": 1},
    }))
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:12]
    files = []
    for i, text in enumerate(texts):
        files.append(work / f"doc{i}.txt")
        files[-1].write_text(text)
    out = run([str(vmt), "fit", "--model", "tiny", "--schedule", "tiny", "--steps", "3",
               "--out", "run", "--text", *map(str, files)], cwd=work, env=env)
    assert "negative ELBO" in out and "IWAE-2" in out
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["steps"] == 3
    assert (work / "run" / "training_curve.png").stat().st_size > 0
