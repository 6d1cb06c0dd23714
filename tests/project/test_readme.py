"""README's two set-up commands are exactly what CI runs, and every doc it links exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_the_readme_commands():
    install, tests = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    # CI may add --out/-q to keep its log short, but otherwise runs the same command lines.
    assert (
        install.replace("pip install -e", "pip install -q -e").replace(
            "msl-kit train", "msl-kit train --out runs/ci-demo"
        )
        in ci
    )
    assert tests in ci


def test_linked_files_exist():
    text = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to missing {target}"


def test_environment_yml_installs_what_the_readme_installs():
    import yaml

    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lines = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    install = _readme_commands()[0]
    extras = install.split('pip install -e ".', 1)[1].split('"', 1)[0]
    assert pip_lines == [f"-e .{extras}"]


def _python_examples() -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", (REPO / "README.md").read_text(), flags=re.S)


def test_python_example_runs(capsys):
    example = _python_examples()[0]
    exec(compile(example, "README.md", "exec"), {})
    assert "{1: " in capsys.readouterr().out


@pytest.mark.xdist_group("default_run")
@pytest.mark.subprocess
@pytest.mark.slow
def test_use_example_runs_as_written_after_the_readme_train_command(default_run, tmp_path):
    """The README's `msl-kit train --out runs/demo` (the session's run of it, `default_run`),
    then its Python example of embed / search / export, as written, from that folder."""
    (example,) = [e for e in _python_examples() if "msl_kit.use" in e]
    shutil.copytree(default_run / "run", tmp_path / "runs" / "demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out characters" in run.stdout
    assert (tmp_path / "test.npz").is_file() and (tmp_path / "model.pt2").is_file()
