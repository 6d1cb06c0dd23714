"""Config values, keys and files refused in one line before any folder or data is touched:
unknown names and keys, bad or non-finite values, YAML that is binary, huge or would run code."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import FAST_ARGS, error_line, run_cli


def test_unknown_dataset_name(tmp_path, capsys):
    rc, err = run_cli(
        capsys, "train", "--out", str(tmp_path / "run"), *FAST_ARGS, "--set", "data.name=nope"
    )
    line = error_line(err)
    assert rc == 2 and "unknown dataset 'nope'; choose one of:" in line and "digits" in line


def test_unknown_config_key_on_the_command_line_and_in_a_file(tmp_path, capsys):
    rc, err = run_cli(capsys, "train", "--out", str(tmp_path / "a"), "--set", "train.lrr=0.1")
    line = error_line(err)
    assert (
        rc == 2
        and "unknown config key 'train.lrr'. Did you mean train.lr" in line
        and "Valid keys:" in line
    )
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text("train:\n  iterations: 5\n  bach_size: 20\n")
    rc, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--config", str(cfg_file))
    assert (
        rc == 2
        and "unknown config key 'train.bach_size'. Did you mean train.batch_size" in error_line(err)
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_yaml_with_a_python_tag_is_refused(tmp_path, capsys):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    evil = "train:\n  iterations: !!python/object/apply:os.system ['touch {}']\n"
    yaml.unsafe_load(evil.format(proof))  # what an unsafe loader would do with this file
    assert proof.exists()
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text(evil.format(marker))
    rc, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--config", str(cfg_file))
    line = error_line(err)
    assert (
        rc == 2
        and str(cfg_file) in line
        and "is not valid YAML" in line
        and "python/object" in line
    )
    assert not marker.exists()


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
    rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, "--set", override)
    assert rc == 2 and key in line and "not allowed" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    rc, line = run_cli(
        capsys, "train", "--out", str(tmp_path / "r"), *FAST_ARGS, "--set", "device=cuda"
    )
    assert rc == 2 and "0 CUDA GPU" in line and "device=cpu" in line


def test_ks_larger_than_the_split_are_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, "--set", "eval.ks=[100000]")
    assert rc == 2 and "eval.ks" in line and "ks <=" in line
    assert not (out / "checkpoint.pt").exists()  # refused before the first step, not after it


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.ms.alpha=.inf", "loss.ms.alpha"),
        ("train.lr=.inf", "train.lr"),
        ("train.head_lr_mult=.nan", "train.head_lr_mult"),
        ("loss.xbm_weight=.nan", "loss.xbm_weight"),
        ("data.crop_scale=[0.5, .nan]", "data.crop_scale"),
        ("seed=-1", "seed"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused_before_any_folder(
    tmp_path, capsys, override, key
):
    out = tmp_path / "run"
    rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, "--set", override)
    assert rc == 2 and line.startswith(f"error: {key} = ") and "not allowed" in line
    assert not out.exists()


def test_a_val_split_too_small_for_the_batch_leaves_the_out_usable(tmp_path, capsys):
    """Item 8: data.val_fraction=0.5 leaves too few classes for a batch of 5 classes: refused
    before anything is written, and the same --out works once the config is fixed."""
    out = tmp_path / "run"
    bad = ["--set", "data.val_fraction=0.5", "--set", "train.batch_size=50"]
    rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, *bad)
    assert rc == 2 and "needs 5 classes" in line
    assert not out.exists()
    out.mkdir()  # an empty folder the user made is kept, and accepted
    rc, line = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, *bad)
    assert rc == 2 and out.is_dir() and not any(out.iterdir())
    fixed = ["--set", "data.val_fraction=0.5", "--set", "train.batch_size=20"]
    rc, printed = run_cli(capsys, "train", "--out", str(out), *FAST_ARGS, *fixed)
    assert rc == 0 and (out / "metrics.json").is_file(), printed


def test_a_binary_yaml_is_named(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x80\x03PK\xff\x00binary")
    rc, line = run_cli(capsys, "train", "--config", str(path), "--out", str(tmp_path / "o"))
    assert rc == 2 and str(path) in line and "not a YAML text file" in line


@pytest.mark.parametrize("body", ["x" * 3_000_000, "loss: {beta: " + "9" * 3_000_000 + "x}"])
def test_a_huge_yaml_error_is_a_short_line(tmp_path, capsys, body):
    path = tmp_path / "huge.yaml"
    path.write_text(body)
    rc, line = run_cli(capsys, "train", "--config", str(path), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(line) < 2100
