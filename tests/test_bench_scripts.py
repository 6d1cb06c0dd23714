"""The benchmark scripts themselves run (tiny sizes); their figures are in docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


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
    assert out.count("images/s") == 8 and "recall_at_k 2000x512" in out
    # one step of each timm recipe (random weights, fake images at the recipe's 224 px)
    for name, backbone in (
        ("cub200_vits16_dino_384", "timm:vit_small_patch16_224.dino"),
        ("cars196_vits16_dino_384", "timm:vit_small_patch16_224.dino"),
        ("sop_vits16_dino_384", "timm:vit_small_patch16_224.dino"),
        ("cub200_resnet50_512", "timm:resnet50.tv_in1k"),
    ):
        assert f"recipe {name}: {backbone} batch 4 at 224 px, none:" in out, out
    tail = "recipe cub200_lite0_cpu: timm:tf_efficientnet_lite0 batch 4 at 224 px, tail after"
    assert out.count(f"{tail} blocks.4 on cached 112x14x14 activations, none:") == 2, out


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
