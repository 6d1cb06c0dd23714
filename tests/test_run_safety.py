"""Issue 11/12: config key order, values refused at load time, run folders that can't be
clobbered, Ctrl-C that keeps the work, resume that says what it runs, one seam for the data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msl_kit import cli
from msl_kit.notebook import explore
from msl_kit.train import rundir
from msl_kit.train.checkpoint import load_model
from msl_kit.train.config import load_config
from msl_kit.train.rundir import RunFolder

DIGITS = ["--config", "digits"]
FAST = [
    "train.iterations=6",
    "train.checkpoint_every=2",
    "train.eval_every=0",
    "train.threads=1",
    "eval.floors=false",
]
FAST_ARGS = [*DIGITS] + [a for s in FAST for a in ("--set", s)]


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    if rc == 2:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return rc, lines[0]
    return rc, err


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("order", ["beta first", "preset first"])
def test_explicit_key_beats_preset_whatever_the_order(tmp_path, order):
    lines = ["    beta: 60", "    preset: paper"]
    if order == "preset first":
        lines.reverse()
    path = tmp_path / "cfg.yaml"
    path.write_text("loss:\n  ms:\n" + "\n".join(lines) + "\n")
    cfg = load_config(path)
    assert cfg.loss.params.beta == 60 and cfg.loss.params.lam == 1.0
    # --set loss.ms.preset after an explicit key: the key still wins, the rest from the preset
    cfg = load_config(path, ["loss.ms.preset=released"])
    assert cfg.loss.params.beta == 60 and cfg.loss.params.lam == 0.5


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-0.001", "train.lr"),
        ("train.warmup=-5", "train.warmup"),
        ("train.samples_per_class=1", "train.samples_per_class"),
        ("loss.ms.margin=-0.5", "loss.ms.margin"),
        ("model.embedding_dim=0", "model.embedding_dim"),
        ("loss.ms.alpha=0", "loss.ms.alpha"),
        ("train.threads=-1", "train.threads"),
        ("train.log_every=0", "train.log_every"),
        ("device=tpu", "device"),
        ("eval.ks=[0]", "eval.ks"),
        ("train.class_draw=random", "train.class_draw"),
    ],
)
def test_bad_values_are_refused_in_one_line_before_any_data_is_read(
    tmp_path, capsys, override, key
):
    out = tmp_path / "run"
    rc, line = _run(capsys, "train", "--out", str(out), *FAST_ARGS, "--set", override)
    assert rc == 2 and key in line and "not allowed" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    rc, line = _run(
        capsys, "train", "--out", str(tmp_path / "r"), *FAST_ARGS, "--set", "device=cuda"
    )
    assert rc == 2 and "0 CUDA GPU" in line and "device=cpu" in line


def test_ks_larger_than_the_split_are_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    rc, line = _run(capsys, "train", "--out", str(out), *FAST_ARGS, "--set", "eval.ks=[100000]")
    assert rc == 2 and "eval.ks" in line and "ks <=" in line
    assert not (out / "checkpoint.pt").exists()  # refused before the first step, not after it


# ----------------------------------------------------------------------------- run folders
def test_second_writer_is_refused_before_touching_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.claim(out, new=True):  # another live process (this one) holds the folder
        (out / "config.yaml").write_text("mine\n")
        before = _files(out)
        rc, line = _run(capsys, "train", "--out", str(out), *FAST_ARGS)
        assert rc == 2 and "in use by another msl-kit run" in line and f"pid {os.getpid()}" in line
        assert _files(out) == before
    assert not (out / RunFolder.LOCK).exists()


@pytest.mark.slow
def test_two_concurrent_trains_into_one_folder_exactly_one_runs(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "msl_kit.cli",
        "train",
        "--out",
        str(out),
        *FAST_ARGS,
        "--set",
        "train.iterations=40",
        "--no-baseline",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while not (out / RunFolder.LOCK).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and (
        "in use by another msl-kit run" in second.stderr or "is not empty" in second.stderr
    )
    assert json.loads((out / "metrics.json").read_text())["iteration"] == 40


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / RunFolder.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(RuntimeWarning, match="gone"):
        with rundir.claim(out, new=False):
            pass


@pytest.mark.parametrize("present", [["best.pt", "metrics.json"], ["config.yaml"], ["notes.txt"]])
def test_non_empty_out_is_refused_and_left_alone(tmp_path, capsys, present):
    out = tmp_path / "proj"
    out.mkdir()
    for name in present:
        (out / name).write_text(f"# my own {name}\n")
    before = _files(out)
    rc, line = _run(capsys, "train", "--out", str(out), *FAST_ARGS)
    assert rc == 2 and "not empty" in line
    assert _files(out) == before


def test_user_config_in_its_own_folder_is_not_overwritten(tmp_path, capsys):
    proj = tmp_path / "myproj"
    proj.mkdir()
    (proj / "config.yaml").write_text("# my commented config\ndata:\n  name: digits\n")
    before = _files(proj)
    rc, _ = _run(capsys, "train", "--config", str(proj / "config.yaml"), "--out", str(proj))
    assert rc == 2 and _files(proj) == before


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    assert cli.main(["train", "--out", str(out), *FAST_ARGS]) == 0
    return out


def test_evaluate_never_replaces_a_checkpoint(finished, capsys):
    before = _files(finished)
    rc, line = _run(
        capsys,
        "evaluate",
        "--checkpoint",
        str(finished / "best.pt"),
        "--out",
        str(finished / "checkpoint.pt"),
    )
    assert rc == 2 and "not written by `msl-kit evaluate`" in line
    assert _files(finished) == before
    # its own earlier output may be replaced
    out = finished.parent / "eval.json"
    assert cli.main(["evaluate", "--checkpoint", str(finished / "best.pt"), "--out", str(out)]) == 0
    assert cli.main(["evaluate", "--checkpoint", str(finished / "best.pt"), "--out", str(out)]) == 0


def test_checkpoint_without_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}}, path)
    rc, line = _run(capsys, "evaluate", "--checkpoint", str(path))
    assert rc == 2 and "no stored config" in line


# ----------------------------------------------------------------------------- resume
def test_edited_config_is_refused_on_resume(finished, tmp_path, capsys):
    run = tmp_path / "copy"
    import shutil

    shutil.copytree(finished, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("iterations: 6", "iterations: 60"))
    before = _files(run)
    rc, line = _run(capsys, "train", "--resume", str(run))
    assert rc == 2 and "was edited" in line and "train.iterations: 6 -> 60" in line
    assert _files(run) == before


def test_resume_overrides_extend_a_finished_run_and_others_are_refused(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    rc, line = _run(capsys, "train", "--resume", str(run), "--set", "loss.ms.beta=60")
    assert rc == 2 and "loss.ms.beta cannot change on --resume" in line
    rc, _ = _run(capsys, "train", "--resume", str(run), "--set", "train.iterations=10")
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iteration"] == 10
    assert metrics["resumes"][0]["iteration"] == 6
    assert metrics["resumes"][0]["overrides"] == ["train.iterations=10"]
    assert load_config(run / "config.yaml").train.iterations == 10
    # ...and equals a run that was asked for 10 iterations from the start
    straight = tmp_path / "straight"
    assert (
        cli.main(["train", "--out", str(straight), *FAST_ARGS, "--set", "train.iterations=10"]) == 0
    )
    ref = json.loads((straight / "metrics.json").read_text())
    assert metrics["recall@1"] == ref["recall@1"] and metrics["map@r"] == ref["map@r"]


# ----------------------------------------------------------------------------- Ctrl-C
CHILD = """
import os, signal, sys
from msl_kit import cli
from msl_kit.train import engine, trainer
at = int(sys.argv[1])
class Interrupt(trainer.Callback):
    def on_step(self, record):
        if record["iteration"] == at:
            os.kill(os.getpid(), signal.SIGINT)
real = engine.train
engine.train = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, Interrupt()], **k)
sys.exit(cli.main(sys.argv[2:]))
"""


# Ctrl-C in a terminal reaches the whole process group, DataLoader workers included: here the
# worker loading batch `at` sends it to its group while the main process trains.
CHILD_WORKERS = """
import os, signal, sys
from msl_kit import cli
from msl_kit.train import trainer
at = int(sys.argv[1])
real = trainer._SeededItems.__getitem__
def getitem(self, key):
    if key[0] == at * 50:
        os.killpg(os.getpgid(0), signal.SIGINT)
    return real(self, key)
trainer._SeededItems.__getitem__ = getitem
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_ctrl_c_saves_and_the_printed_command_resumes_to_identical_metrics(tmp_path, workers):
    at = int(np.random.default_rng().integers(1, 19))
    args = [
        "train",
        *DIGITS,
        "--set",
        f"data.workers={workers}",
        "--set",
        "train.iterations=20",
        "--set",
        "train.checkpoint_every=50",
        "--set",
        "train.eval_every=10",
        "--set",
        "train.threads=1",
        "--no-baseline",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD_WORKERS if workers else CHILD,
            str(at),
            *args,
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    assert child.returncode == 130, child.stderr[-2000:]
    assert f"msl-kit train --resume {out}" in child.stderr and "DIR" not in child.stderr
    assert "Traceback" not in child.stderr, child.stderr[-2000:]
    command = child.stderr.split("Continue with: ")[1].split()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    assert saved == at if not workers else 1 <= saved <= at
    resumed = subprocess.run(
        [sys.executable, "-m", "msl_kit.cli", *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    assert (
        subprocess.run(
            [sys.executable, "-m", "msl_kit.cli", *args, "--out", str(straight)],
            env=env,
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((straight / "metrics.json").read_text())
    assert {k: v for k, v in a.items() if k != "best"} == {
        k: v for k, v in b.items() if k != "best"
    }


@pytest.mark.slow
def test_same_seed_same_threads_gives_byte_identical_history_across_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "msl_kit.cli",
            "train",
            "--out",
            str(out),
            "--set",
            "train.iterations=20",
            "--set",
            "train.threads=2",
            "--set",
            "train.log_every=5",
            "--set",
            "train.eval_every=0",
            "--no-baseline",
        ]
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
        outs.append((out / "history.csv").read_bytes())
    assert outs[0] == outs[1]
    assert b"pos_kept" in outs[0] or b"loss" in outs[0]


# ----------------------------------------------------------------------------- one data seam
def test_skip_corrupt_means_the_same_in_training_evaluation_and_notebooks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, classes in (("train", range(4)), ("test", range(4, 8))):
        for c in classes:
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = (rng.random((12, 12)) * 255).astype(np.uint8) // (c + 1)
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    (tmp_path / "data" / "test" / "c4" / "bad.png").write_bytes(b"not an image")
    sets = [
        "--set",
        f"data.root={tmp_path / 'data'}",
        "--set",
        "data.name=folder",
        "--set",
        "data.skip_corrupt=true",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.samples_per_class=2",
        "--set",
        "model.convnet.input_size=12",
        "--set",
        "eval.ks=[1, 2]",
    ]
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        assert cli.main(["train", "--out", str(out), *FAST_ARGS, *sets]) == 0
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    model, cfg = load_model(out)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        emb, labels, _ = explore.split_embeddings(model, cfg)
    assert len(emb) == 4 * 6


def test_model_side_owns_the_preprocessing_spec():
    import msl_kit.models

    for path in Path(msl_kit.models.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert "msl_kit.datasets" not in source and "import transforms" not in source
