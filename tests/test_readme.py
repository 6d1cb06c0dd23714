"""README's two set-up commands are exactly what CI runs, and every doc it links exists."""

from __future__ import annotations

import re

from conftest import REPO


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


def test_python_example_runs(capsys):
    text = (REPO / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.+?)\n```", text, flags=re.S)
    exec(compile(example, "README.md", "exec"), {})
    assert "{1: " in capsys.readouterr().out
