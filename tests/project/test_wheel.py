"""Installed as a package, not as a clone: a wheel carries every recipe, study and the embedded
set, and works from an empty folder with no source tree anywhere near it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPO

# One wheel build, in the checkout's build/ folder: every test of this file on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.xdist_group("wheel")]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh venv holding only the built wheel; its dependencies (torch & co.) come from this
    environment's site-packages as a plain path, so msl_kit's own editable hook is not seen."""
    base = tmp_path_factory.mktemp("wheel")
    # No PYTHONPATH (other tests put the checkout there): pip would see the checkout's
    # msl_kit.egg-info, call the wheel "already satisfied" and install nothing.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(base / "dist"), "-q"],
        capture_output=True, text=True, timeout=600, env=clean,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("msl_kit-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600, env=clean,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Only now: had pip seen this environment's msl_kit through deps.pth, it would have called
    # the wheel "already satisfied" and installed nothing.
    site = next((venv / "lib").glob("python*/site-packages"))
    assert list(site.glob("msl_kit-*.dist-info")), "the wheel was not installed"
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in clean.items() if k != "VIRTUAL_ENV"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    empty = base / "empty"
    empty.mkdir()
    return empty, env


def run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_imports_msl_kit_from_itself_not_from_the_checkout(wheel_env):
    cwd, env = wheel_env
    done = run(["python", "-c", "import msl_kit; print(msl_kit.__file__)"], cwd, env)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout and str(REPO) not in done.stdout


def test_digits_recipe_trains_from_an_empty_folder(wheel_env):
    cwd, env = wheel_env
    argv = ["msl-kit", "train", "--config", "digits", "--set", "train.iterations=5", "--out", "r"]
    done = run(argv, cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "r" / "metrics.json").is_file() and "R@1" in done.stdout


def test_a_wrong_recipe_name_lists_the_shipped_recipes(wheel_env):
    cwd, env = wheel_env
    done = run(["msl-kit", "train", "--config", "no-such-name"], cwd, env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    shipped = sorted(p.stem for p in (REPO / "msl_kit" / "configs").glob("*.yaml"))
    assert all(name in done.stderr for name in shipped), done.stderr


def test_every_recipe_and_every_study_loads_from_the_wheel(wheel_env):
    cwd, env = wheel_env
    check = (
        "from msl_kit.train.config import CONFIG_DIR, load_config\n"
        "from msl_kit.sweep.spec import STUDY_DIR, make_spec\n"
        "names = sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))\n"
        "studies = sorted(p.stem for p in STUDY_DIR.glob('*.yaml'))\n"
        "for n in names: load_config(n)\n"
        "for s in studies: make_spec(study=s)\n"
        "print(len(names), len(studies), CONFIG_DIR)\n"
    )
    done = run(["python", "-c", check], cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    n_recipes, n_studies, where = done.stdout.split()
    assert int(n_recipes) == len(list((REPO / "msl_kit" / "configs").glob("*.yaml")))
    assert int(n_studies) == len(list((REPO / "msl_kit" / "configs" / "sweeps").glob("*.yaml")))
    assert "site-packages" in where


def test_bench_says_in_one_line_that_benchmarks_come_with_the_checkout(wheel_env):
    cwd, env = wheel_env
    done = run(["msl-kit", "bench", "loss"], cwd, env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "source checkout" in done.stderr
