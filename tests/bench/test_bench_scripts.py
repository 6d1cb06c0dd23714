"""The benchmark scripts themselves run (tiny sizes); their figures are in docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.subprocess
@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "grad cosine" in out and "finite True" in out
    assert out.count("images/s") == 6 and "recall_at_k 2000x512" in out
    # one step of each timm recipe (random weights, fake images at the recipe's 224 px)
    for name, backbone in (
        ("cub200_vits16_dino_384", "timm:vit_small_patch16_224.dino"),
        ("cars196_vits16_dino_384", "timm:vit_small_patch16_224.dino"),
        ("sop_vits16_dino_384", "timm:vit_small_patch16_224.dino"),
        ("cub200_resnet50_512", "timm:resnet50.tv_in1k"),
    ):
        assert f"recipe {name}: {backbone} batch 4 at 224 px, none:" in out, out


@pytest.mark.subprocess
@pytest.mark.slow
def test_mining_overhead_script_prints_the_ratio():
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "mining_overhead.py"),
            "--steps",
            "2",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "% of a step" in done.stdout and "per step at log_every=10" in done.stdout


@pytest.mark.subprocess
@pytest.mark.slow
def test_search_scale_script_prints_every_index_and_the_done_when_command(use_run, tmp_path):
    run = use_run  # 64-d
    args = [sys.executable, str(REPO / "bench" / "search_scale.py"), "--checkpoint", str(run)]
    args += ["--dim", "64", "--sizes", "12000", "--queries", "50", "--repeats", "1"]
    args += ["--threads", "1", "--cli", str(tmp_path / "cli")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "synthetic against real: 4,840 vectors, 242 classes each" in out and "LID@20" in out
    assert "12,000 x 64 gallery, 50 queries, k = 10" in out
    for kind in ("exact", "flat", "ivf", "ivfpq", "hnsw"):
        assert f"\n{kind:6s} " in out
    assert "recall@10 of the --faiss hnsw CSV against the exact CSV: " in out
    assert "model for 10,000,000 vectors" in out
    assert (tmp_path / "cli" / "big.hnsw.faiss").is_file()
