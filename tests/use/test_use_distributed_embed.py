"""`torchrun --nproc_per_node 2 -m msl_kit.cli embed ...` (issue 27 item 3): two CPU processes on
gloo write the same bytes as one process, only rank 0 reports, and a rank killed mid-run (either
one) leaves pieces that a rerun completes to those same bytes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO

N_IMAGES = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.ddp,
    pytest.mark.xdist_group("ddp_embed"),  # one module-scoped job, built once
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds ranks in /proc"),
]


@pytest.fixture(scope="module")
def job(tmp_path_factory, use_run, held_out) -> tuple[Path, Path, Path]:
    """A tiny run, a CSV of 300 labelled held-out images, and the file one process makes."""
    base = tmp_path_factory.getbasetemp()
    run, written = use_run, held_out[1][:N_IMAGES]
    images = base / "ranks.csv"
    images.write_text("\n".join(f"{p},{Path(p).parent.name}" for p in written) + "\n")
    one = base / "one_process" / "ranks.npz"  # as deep as a test's tmp_path: the same
    one.parent.mkdir(exist_ok=True)  # checkpoint_relative
    if not one.exists():
        done = subprocess.run(_embed(run, images, one), env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    return run, images, one


def _env(**more: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **more}


def _embed(run: Path, images: Path, out: Path, ranks: int = 1) -> list[str]:
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        launch += ["--monitor-interval", "0.1"]
    args = ["--images", str(images), "--out", str(out), "--batch-size", "4", "--chunk-size", "4"]
    return [*launch, "-m", "msl_kit.cli", "embed", "--checkpoint", str(run), *args]


def _rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the workers whose environment holds `marker` (torchrun's own agent has
    no RANK)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MSL_TEST_JOB={marker}".encode() in env:
            rank = [e[5:] for e in env if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0])] = int(proc.name)
    return found


def test_two_processes_write_the_bytes_of_one_and_report_once(job, tmp_path):
    run, images, one = job
    out = tmp_path / "two.npz"
    done = subprocess.run(_embed(run, images, out, 2), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == one.read_bytes()
    assert done.stdout.count(f"{N_IMAGES} images -> 64-d vectors") == 1  # rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.npz"]  # no pieces, no lock


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_run_leaves_pieces_a_rerun_completes(job, tmp_path, victim):
    run, images, one = job
    out, part = tmp_path / "cut.npz", tmp_path / "cut.npz.part"
    marker = uuid.uuid4().hex
    cmd = _embed(run, images, out, 2)
    proc = subprocess.Popen(cmd, env=_env(MSL_TEST_JOB=marker), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    pids = {}
    while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
        pids = _rank_pids(marker)
        time.sleep(0.05)
    while len(list(part.glob("chunk_*.npz"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pids[victim], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err.decode()[-3000:]
    assert not out.exists()
    kept = len(list(part.glob("chunk_*.npz")))
    assert 8 <= kept < N_IMAGES // 4  # some pieces written, not all
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"holds {kept} of the {N_IMAGES // 4} pieces" in again.stderr  # only the rest redone
    assert out.read_bytes() == one.read_bytes()
    assert not part.exists() and not (tmp_path / ".cut.npz.lock").exists()


def test_bad_input_under_torchrun_is_one_error_line(job, tmp_path):
    run, _, _ = job
    cmd = _embed(run, tmp_path / "no_such_folder", tmp_path / "x.npz", 2)
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert done.returncode != 0
    said = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert said == [f"error: no such folder or file: {tmp_path / 'no_such_folder'}"], said
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_sees_another_folder_stops_and_one_process_resumes(job, tmp_path):
    """Rank 1 given another --out folder is what a machine without the shared disk sees: it
    stops in one line, rank 0 says a peer stopped, and rank 0's pieces are kept for a rerun
    with one process (any number of processes resumes the same pieces)."""
    run, images, one = job
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "cut.npz"  # as deep as `one`: the same checkpoint_relative
    port = str(_free_port())
    procs = []
    for rank, where in ((0, out), (1, tmp_path / "elsewhere" / "cut.npz")):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = _embed(run, images, where)
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    lines = [[ln for ln in e.splitlines() if ln.startswith("error: ")] for e in errs]
    assert len(lines[0]) == 1 and "another process of this torchrun job stopped" in lines[0][0]
    elsewhere = tmp_path / "elsewhere" / "cut.npz.part"
    assert len(lines[1]) == 1 and f"rank 1 does not see the {elsewhere}" in lines[1][0], errs
    assert not out.exists() and not elsewhere.exists()
    kept = len(list(out.with_name("cut.npz.part").glob("chunk_*.npz")))
    assert 0 < kept < N_IMAGES // 4  # rank 0's share only
    again = subprocess.run(_embed(run, images, out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"holds {kept} of the {N_IMAGES // 4} pieces" in again.stderr
    assert out.read_bytes() == one.read_bytes()
