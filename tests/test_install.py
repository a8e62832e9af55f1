"""The package as a user installs it: a wheel built from this tree, installed outside the checkout, runs every
command with its packaged defaults from any folder (the offline recipe of BUILD.md builds this wheel), and
every command follows the one command-line convention (README, "Command-line convention")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder with the installed wheel, environment whose PYTHONPATH is only that folder)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # build from a copy: the build must not write into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    for pkg in ("clips_jax", "convert_weights"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = root / "wheels"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("clips_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {f"clips_jax/configs/{c}.py" for c in ("default", "tmtv_finetune", "curriculum_study")} <= set(names)
    target = root / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    return target, env


def test_installed_copy_not_the_checkout_runs_the_tiny_default_elsewhere(installed, tmp_path):
    target, env = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import clips_jax, clips_jax.configs as c; print(clips_jax.__file__);print(c.default_path())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    module_file, config = r.stdout.split()
    assert Path(module_file).is_relative_to(target) and Path(config).is_relative_to(target)
    script = target / "bin" / "clips-train"
    assert script.is_file()
    r = subprocess.run(
        [
            str(script),
            "--config",
            "default:tiny",
            "--workdir",
            str(elsewhere / "run"),
            f"--config.data.phantoms.cache={elsewhere / 'cache'}",
            "--config.steps=2",
            "--config.eval.every_steps=0",
            "--config.eval.at_start=False",
            "--config.quiet=True",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (elsewhere / "run" / "summary.json").is_file()
    assert not (REPO / "run").exists() and not (REPO / "build").exists()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_has_help_with_examples_and_one_line_usage_errors(installed, name, tmp_path):
    target, env = installed
    script = target / "bin" / name
    r = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Examples" in r.stdout and "flags:" in r.stdout
    r = subprocess.run(
        [str(script), "--no_such_flag=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
