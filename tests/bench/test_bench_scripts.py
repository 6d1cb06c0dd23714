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
def test_prefix_step_script_prints_the_three_steps_and_their_ratios():
    """bench/prefix_step.py --quick: full, frozen and cached steps of the photo recipe on random
    images (the prefix cache built in a temporary folder), each timed, and the two ratios."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "prefix_step.py"), "--quick", "--steps", "2"]
        + ["--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "timm:tf_efficientnet_lite0, batch 4 at 64 px, prefix up to blocks.4" in out, out
    for kind in ("full", "frozen", "cached"):
        assert f"{kind:>7} step: " in out
    assert "full / cached: " in out and "frozen / cached: " in out
    assert "set-up of the cached trainer, cache built where missing: +" in out


@pytest.mark.subprocess
@pytest.mark.slow
def test_photos_report_rebuilds_only_its_own_section(tmp_path):
    """bench/photos.py --report-only: the `## Real photos` section from the run JSONs, the rest
    of the page kept; MS's verdict against the floor counts the seeds' spread."""
    import json

    results = tmp_path / "photos"
    results.mkdir()
    grid = {"command": "python bench/photos.py", "machine": "x86_64", "cores": 2, "torch": "2",
            "threads": 2, "results": "docs/results/photos", "cache_s": 900.0}  # fmt: skip
    (results / "grid.json").write_text(json.dumps(grid))
    floors = {"backbone": dict.fromkeys(["recall@1", "recall@2", "recall@4", "recall@8"], 0.85)}
    floors["backbone"]["map@r"] = 0.39
    for method, r1s in (("ms", (0.87, 0.88, 0.86)), ("triplet", (0.86, 0.87, 0.85))):
        for seed, r1 in enumerate(r1s):
            metrics = {"recall@1": r1, "recall@2": 0.9, "recall@4": 0.95, "recall@8": 0.97}
            rec = dict(method=method, seed=seed, wall_s=600.0, load_before=3.0, load_after=4.0)
            rec.update(curve={"100": r1 - 0.01, "200": r1}, metrics={**metrics, "map@r": 0.4})
            rec.update(floors=floors if seed == 0 else {}, iterations=200, batch_size=40)
            rec.update(samples_per_class=5, lr=3e-5, views=5, prefix="blocks.4")
            (results / f"{method}__seed{seed}.json").write_text(json.dumps(rec))
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nintro\n\n## Ablations\n\nkept\n")
    cmd = [sys.executable, str(REPO / "bench" / "photos.py"), "--report-only"]
    cmd += ["--results", str(results), "--out", str(out)]
    for _ in range(2):  # the second run replaces the section, it does not add one
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.count("## Real photos") == 1 and text.startswith("# Results\n\nintro")
    assert "## Ablations\n\nkept" in text
    assert "| MS (released 2/40/0.5/0.1) | 0,1,2 | 87.0 ± 1.0 |" in text
    assert "| backbone as loaded (floor) | - | 85.0 |" in text
    assert "+2.0 points" in text and "**beats the frozen floor by more than the spread**" in text
    assert "MS is **tied with** triplet" in text and "| 200 | 87.0 | 86.0 |" in text
    assert "MAP@R (the whole ranking, not only the top hit): MS 40.0 vs the floor's 39.0" in text
    for seed in (1, 2):  # one seed left: differences, no verdict
        (results / f"ms__seed{seed}.json").unlink()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "+2.0 points from one seed: no spread yet, so no verdict" in text
    assert "beats the frozen floor" not in text and "one seed on a side, no verdict" in text


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
