"""`msl-kit embed`: the vectors evaluate scores, labels from folders / CSV, bad inputs in one line,
and an interrupted run (SIGINT, SIGKILL) that resumes to the same bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, printed_error
from PIL import Image

from msl_kit import cli
from msl_kit.train import checkpoint, engine, evaluation, recipe
from msl_kit.use.embedding import embed
from msl_kit.use.index import Embeddings


@pytest.mark.slow
def test_folder_tree_gives_evaluates_vectors_and_recall(use_run, held_out, tmp_path, capsys):
    folder, written = held_out
    out = tmp_path / "test.npz"
    assert (
        cli.main(
            ["embed", "--checkpoint", str(use_run), "--images", str(folder), "--out", str(out)]
        )
        == 0
    )
    emb = Embeddings.load(out)
    assert emb.embeddings.dtype == np.float32 and emb.embeddings.shape == (2240, 64)
    assert len(emb.classes) == 112 and emb.labels is not None and not emb.skipped
    # the vectors `evaluate` scores, item by item (matched by file)
    model, cfg = checkpoint.load_model(use_run)
    query, _ = recipe.eval_data(cfg)
    ref, _ = evaluation.extract(model, query, torch.device("cpu"), recipe.eval_options(cfg))
    row = emb.positions(np.array(written))
    assert (row >= 0).all()
    np.testing.assert_allclose(emb.embeddings[row], ref.numpy(), atol=1e-6)
    # search with every image as a query: evaluate's R@1; with --keep-self each finds itself
    results, _ = engine.evaluate_checkpoint(use_run / "checkpoint.pt")
    csv_out = tmp_path / "r.csv"
    args = ["search", "--index", str(out), "--query", str(out), "-k", "1", "--out", str(csv_out)]
    capsys.readouterr()
    assert cli.main(args) == 0
    r1 = float(re.search(r"R@1 ([\d.]+)%", capsys.readouterr().out).group(1))
    assert abs(r1 - 100 * results["recall@1"]) <= 0.1
    assert cli.main([*args[:-2], "--keep-self", "--out", str(csv_out)]) == 0
    rows = csv_out.read_text().splitlines()[1:]
    assert len(rows) == 2240 and all(r.split(",")[0] == r.split(",")[3] for r in rows)


@pytest.mark.slow
def test_csv_flat_folder_and_dataset_split(use_run, held_out, tmp_path):
    folder, written = held_out
    rows = ["path,label"] + [f"{p},{Path(p).parent.name}" for p in written[:40]]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    from_csv = embed(use_run, tmp_path / "list.csv", progress=False)
    from_tree = embed(use_run, folder, tmp_path / "t.npz", progress=False)
    row = from_tree.positions(from_csv.paths)
    np.testing.assert_array_equal(from_csv.embeddings, from_tree.embeddings[row])
    np.testing.assert_array_equal(from_csv.class_names(), from_tree.class_names()[row])
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in written[:3]:
        (flat / Path(p).name).write_bytes(Path(p).read_bytes())
    assert embed(use_run, flat, progress=False).labels is None  # a flat folder has no labels
    split = embed(use_run, dataset="omniglot_small", split="test", progress=False)
    assert len(split) == 2240 and split.paths[0].startswith("omniglot_small:")
    np.testing.assert_array_equal(
        split.embeddings, from_tree.embeddings[from_tree.positions(np.array(written))]
    )


def test_unreadable_files_are_skipped_with_a_count(use_run, held_out, tmp_path, capsys):
    _, written = held_out
    folder = tmp_path / "mixed" / "a"
    folder.mkdir(parents=True)
    for p in written[:4]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    buf = tmp_path / "photo.jpg"
    Image.fromarray(np.full((60, 60, 3), 128, np.uint8)).save(buf)
    (folder / "broken.jpg").write_bytes(buf.read_bytes()[:300])  # truncated JPEG
    out = tmp_path / "m.npz"
    assert (
        cli.main(
            [
                "embed",
                "--checkpoint",
                str(use_run),
                "--images",
                str(tmp_path / "mixed"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert (
        len(err) == 1
        and "skipped 2 " in err[0]
        and "broken.jpg" in err[0]
        and "notes.txt" in err[0]
    )
    emb = Embeddings.load(out)
    assert len(emb) == 4 and sorted(Path(p).name for p in emb.skipped) == [
        "broken.jpg",
        "notes.txt",
    ]


def test_bad_inputs_are_one_line(use_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = ["embed", "--checkpoint", str(use_run), "--out"]
    assert cli.main([*base, str(tmp_path / "e.npz"), "--images", str(tmp_path / "empty")]) == 2
    assert "no files to embed" in printed_error(capsys)
    mine = tmp_path / "precious.npz"
    mine.write_bytes(b"my own data")
    assert cli.main([*base, str(mine), "--images", str(tmp_path / "empty")]) == 2
    assert "not an embeddings file" in printed_error(capsys) and mine.read_bytes() == b"my own data"
    assert cli.main([*base, str(tmp_path / "x.npz"), "--images", str(tmp_path / "nope")]) == 2
    assert "no such folder" in printed_error(capsys)
    assert cli.main([*base, str(tmp_path / "x.npz")]) == 2
    printed_error(capsys)
    assert not list(tmp_path.glob("*.part"))


def test_file_is_deterministic_and_rerun_is_a_no_op(use_run, held_out, tmp_path):
    _, written = held_out
    (tmp_path / "l.csv").write_text("\n".join(written[:50]) + "\n")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    embed(use_run, tmp_path / "l.csv", a, progress=False, chunk_size=16, batch_size=8)
    embed(use_run, tmp_path / "l.csv", b, progress=False, chunk_size=16, batch_size=8)
    assert a.read_bytes() == b.read_bytes()
    stamp = a.stat().st_mtime_ns
    embed(use_run, tmp_path / "l.csv", a, progress=False, chunk_size=16, batch_size=8)
    assert a.stat().st_mtime_ns == stamp  # up to date: read, not redone
    with np.load(a) as z:  # a plain numpy archive, no pickle
        assert z.files[:2] == ["embeddings", "paths"] and "labels" not in z.files  # no labels
        assert json.loads(str(z["preprocessing"]))["input_size"] == 28


def test_an_image_replaced_at_the_same_path_is_embedded_again(use_run, held_out, tmp_path):
    """Up to date means the same files, not only the same names: a rerun after one image was
    replaced (same path, new content) gives that image's new vector."""
    _, written = held_out
    for i, src in enumerate(written[:4]):
        shutil.copy(src, tmp_path / f"{i}.png")
    out = tmp_path / "e.npz"
    before = embed(use_run, tmp_path, out, progress=False).embeddings
    first = tmp_path / "0.png"
    first.write_bytes(Path(written[40]).read_bytes())  # another character's drawing
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    after = embed(use_run, tmp_path, out, progress=False).embeddings
    assert not np.allclose(before[0], after[0]) and np.allclose(before[1:], after[1:])


def _embed_cmd(use_run: Path, images: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "msl_kit.cli",
        "embed",
        "--checkpoint",
        str(use_run),
        "--images",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--chunk-size",
        "32",
    ]


# `msl-kit embed` in a child that sends itself the signal right after its 10th piece is saved:
# the stop lands mid-job however fast the machine embeds (the test used to signal from outside
# once 10 pieces showed, and on a loaded machine the other 28 were done before it did).
SIGNAL_AFTER_10_PIECES = """
import os, sys
from msl_kit import cli
from msl_kit.use import embedding
sig, real, saved = int(sys.argv[1]), embedding.save_piece, []
def save_piece(*args, **kwargs):
    real(*args, **kwargs)
    saved.append(args[0])
    if len(saved) == 10:
        os.kill(os.getpid(), sig)
embedding.save_piece = save_piece
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_embed_resumes_to_the_same_bytes(use_run, held_out, tmp_path, sig):
    _, written = held_out
    images = tmp_path / "l.csv"
    images.write_text("\n".join(written[:1200]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    whole, cut = tmp_path / "whole.npz", tmp_path / "cut.npz"
    subprocess.run(_embed_cmd(use_run, images, whole), env=env, check=True, capture_output=True)
    child = [sys.executable, "-c", SIGNAL_AFTER_10_PIECES, str(int(sig))]
    proc = subprocess.run(
        [*child, *_embed_cmd(use_run, images, cut)[3:]], env=env, capture_output=True, timeout=300
    )
    part, err = tmp_path / "cut.npz.part", proc.stderr
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    done = len(list(part.glob("chunk_*.npz")))
    assert 10 <= done < 1200 // 32 and not cut.exists()
    if sig == signal.SIGINT:
        assert "rerun the same command" in err.decode()
    again = subprocess.run(
        _embed_cmd(use_run, images, cut), env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    resumed_at = int(re.search(r"\| *(\d+)/1200", again.stderr).group(1))
    assert resumed_at == done * 32  # the bar starts where the kept pieces end
    assert cut.read_bytes() == whole.read_bytes()
    assert not part.exists()
