"""`msl-kit export`: a module that, in a process without msl_kit, turns uint8 crops made by
following its description (NAME.json) into the vectors `embed` writes (within 1e-4), in both
formats (.pt2 torch.export, .pt TorchScript); what export may replace; all its files or none."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_use import tiny_run
from PIL import Image

from msl_kit import cli
from msl_kit.datasets import transforms
from msl_kit.preprocessing import Preprocessing
from msl_kit.use import exporting
from msl_kit.use.embedding import embed
from msl_kit.use.exporting import UInt8Model, export, to_uint8

# `.pt` exports warn that torch deprecates TorchScript (a test below checks that they do)
pytestmark = pytest.mark.filterwarnings("ignore:torch deprecates TorchScript:FutureWarning")

# A user with Pillow, numpy and torch, following the description field by field (never
# imports msl_kit). argv: the output folder, then descriptions, "--", then the images. For each
# description it saves the module's vectors, and the vectors of the export-1 recipe (convert,
# bilinear, two resamplings), which this test must show to be wrong.
OUTSIDE = """
import json, sys
import numpy as np, torch
from PIL import Image

def decode(path, d):
    mode = d["mode"]
    img = Image.open(path)
    if img.format == "JPEG":
        img.draft(mode, tuple(d["jpeg_draft"]["size"]))
    img.load()
    if img.mode == mode:
        return img
    if img.mode in d["sixteen_bit"]["modes"]:
        a = np.clip(np.asarray(img, np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert(mode)
    if img.mode in d["alpha"]["modes"] or (img.mode == "P" and "transparency" in img.info):
        bg = Image.new("RGBA", img.size, tuple(d["alpha"]["background"]) + (255,))
        return Image.alpha_composite(bg, img.convert("RGBA")).convert(mode)
    return img.convert(mode)

def crop(img, side, s, interpolation, mode):
    f = Image.Resampling[interpolation.upper()]
    w, h = img.size
    rw, rh = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    left, top = round((rw - s) / 2), round((rh - s) / 2)
    if mode == "two_step":
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), f)
        img = img.crop((left, top, left + s, top + s))
    else:
        box = (left * (w / rw), top * (h / rh), (left + s) * (w / rw), (top + s) * (h / rh))
        img = img.resize((s, s), f, box=box)
    a = np.asarray(img)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

out, rest = sys.argv[1], sys.argv[2:]
descriptions, images = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
for path in descriptions:
    meta = json.load(open(path))
    folder = path.rsplit("/", 1)[0]
    side, s = meta["resize"]["shorter_side"], meta["crop"]["size"]
    how = (meta["resize"]["interpolation"], meta["crop"]["mode"])
    good = [crop(decode(p, meta["decode"]), side, s, *how) for p in images]
    naive = [crop(Image.open(p).convert(meta["decode"]["mode"]), side, s, "bilinear", "two_step")
             for p in images]
    module = f"{folder}/{meta['module']}"
    if meta["module_format"] == "torch.export":
        model = torch.export.load(module).module()
    else:
        model = torch.jit.load(module)
    with torch.no_grad():
        for name, batch in (("good", good), ("naive", naive)):
            vectors = model(torch.from_numpy(np.stack(batch))).numpy()
            np.save(f"{out}/{meta['module']}.{name}.npy", vectors)
assert "msl_kit" not in sys.modules
"""


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """An untrained timm:resnet18 checkpoint at 32 px (bicubic, crop two_step), no training."""
    pytest.importorskip("timm")
    from msl_kit.train.checkpoint import load_model, save_checkpoint
    from msl_kit.train.config import load_config, to_dict

    sets = ["model.backbone=timm:test_efficientnet.r160_in1k", "model.pretrained=none"]
    sets.append("model.timm.input_size=32")
    cfg = load_config(None, sets + ["model.embedding_dim=16"])
    model, _ = load_model(None, cfg)
    path = tmp_path_factory.mktemp("timm_run") / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def awkward_images(folder: Path) -> list[str]:
    """Files whose decoding takes every branch `embed` has: RGBA, palette with transparency,
    16-bit grey, plain grey, a JPEG big enough for draft decoding; odd sizes, both
    orientations."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    rgba = rng.integers(0, 256, (31, 45, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 45, dtype=np.uint8)  # transparent to opaque
    grey = rng.integers(0, 256, (47, 33), dtype=np.uint8)
    deep = (np.linspace(0, 65535, 40 * 36).reshape(36, 40)).astype(np.uint16)
    palette = Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).quantize(16)
    photo = np.kron(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), np.ones((10, 10, 1)))
    files = {
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "grey.png": Image.fromarray(grey, "L"),
        "deep.png": Image.fromarray(deep),
        "palette.png": palette,
        "photo.jpg": Image.fromarray(photo.astype(np.uint8)),
    }
    for name, img in files.items():
        extra = {"transparency": 3} if name == "palette.png" else {}
        img.save(folder / name, **extra)
    with Image.open(folder / "deep.png") as deep, Image.open(folder / "palette.png") as pal:
        assert deep.mode in transforms.SIXTEEN_BIT_MODES and "transparency" in pal.info
    return [str(folder / name) for name in files]


def _outside(tmp_path: Path, descriptions: list[Path], images: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", OUTSIDE, str(tmp_path), *map(str, descriptions), "--", *images],
        cwd=tmp_path,  # not the repository: msl_kit cannot be imported from here
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # two models, two formats, one process without msl_kit: ~12 s on 2 cores
def test_a_user_following_the_description_gets_embeds_vectors_without_msl_kit(
    run, timm_run, tmp_path
):
    """Issue 24 item 8: the description carries every step embed applies (JPEG draft,
    transparency and its colour, 16-bit, palette, grey, interpolation, both crop modes), for
    the convnet (grey, fused crop) and a timm model (RGB, bicubic, two_step), in both formats;
    the export-1 recipe (convert, bilinear, two resamplings) is shown to miss by > 1e-3."""
    images = awkward_images(tmp_path / "images")
    exports = {
        "convnet.pt2": run,
        "convnet_ts.pt": run,
        "timm.pt2": timm_run,
        "timm_ts.pt": timm_run,
    }
    for name, ckpt in exports.items():
        assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / name)]) == 0
    descriptions = [(tmp_path / name).with_suffix(".json") for name in exports]
    convnet, _, timm_meta, _ = (json.loads(d.read_text()) for d in descriptions)
    assert convnet["crop"]["mode"] == "fused" and convnet["input"]["shape"] == ["N", 1, 28, 28]
    assert timm_meta["resize"]["interpolation"] == "bicubic"
    assert timm_meta["crop"]["mode"] == "two_step" and timm_meta["input"]["shape"][1] == 3
    _outside(tmp_path, descriptions, images)
    (tmp_path / "l.csv").write_text("\n".join(images) + "\n")
    refs = {ckpt: embed(ckpt, tmp_path / "l.csv", progress=False) for ckpt in (run, timm_run)}
    for name, ckpt in exports.items():
        ref = refs[ckpt]
        assert list(ref.paths) == images and not len(ref.skipped)
        good = np.load(tmp_path / f"{name}.good.npy")
        np.testing.assert_allclose(good, ref.embeddings, atol=1e-4, rtol=0)
        assert np.abs(np.linalg.norm(good, axis=1) - 1).max() < 1e-5
        naive = np.load(tmp_path / f"{name}.naive.npy")
        assert np.abs(naive - ref.embeddings).max() > 1e-3


@pytest.mark.parametrize("crop", ["two_step", "fused"])
def test_8_the_description_says_what_the_spec_says(crop):
    """Fast half of item 8 (the slow test above runs it): timm's resnet18 is bicubic, and the
    description says so, with the crop arithmetic of the mode in use."""
    pytest.importorskip("timm")
    import dataclasses

    from msl_kit.models.builder import preprocessing_spec
    from msl_kit.use.description import describe

    spec = dataclasses.replace(preprocessing_spec("timm:resnet18", input_size=32), crop=crop)
    info = describe(spec, 16, "m.pt2", "torch.export", "m.json")
    assert info["resize"]["interpolation"] == "bicubic" == spec.interpolation
    assert info["resize"]["pillow_filter"] == "Image.Resampling.BICUBIC"
    assert info["resize"]["shorter_side"] == spec.resize_size == 33
    assert info["crop"]["mode"] == crop and ("box=" in info["crop"]["pillow"]) == (crop == "fused")
    assert info["decode"]["alpha"]["background"] == list(transforms.ALPHA_BACKGROUND)
    assert info["decode"]["jpeg_draft"]["size"] == [33, 33]
    assert "bicubic" in info["how"] and info["load"] == "torch.export.load('m.pt2').module()"


def test_colour_order_and_scaling_happen_inside():
    """A BGR, 0-255 spec (BN-Inception's): the module given RGB uint8 sees what the eval
    transform gives the network, channel by channel."""
    spec = Preprocessing(
        color="BGR",
        value_range=255.0,
        mean=(104.0, 117.0, 128.0),
        std=(1.0,) * 3,
        input_size=8,
        resize_size=8,
    )
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # red saturated: a channel swap cannot go unnoticed
    seen = UInt8Model(torch.nn.Identity(), spec)(torch.from_numpy(rgb.transpose(2, 0, 1))[None])
    expected = transforms.build_transform(spec, train=False)(Image.fromarray(rgb))
    torch.testing.assert_close(seen[0], expected, atol=0, rtol=0)
    assert seen[0, 2].max() == 255 - 128  # red is the network's third channel
    np.testing.assert_array_equal(to_uint8(expected[None], spec)[0].numpy(), rgb.transpose(2, 0, 1))


def test_export_into_a_folder_is_one_line(run, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def test_onnx_runs_where_onnxruntime_is_installed(run, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnx")
    out = tmp_path / "model.pt2"
    cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--onnx"])
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    onnx_out = ort.InferenceSession(str(out.with_suffix(".onnx"))).run(None, {"images": x})[0]
    pt2_out = torch.export.load(str(out)).module()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(onnx_out, pt2_out, atol=1e-5)


def test_the_description_names_the_checkpoint_and_each_files_digest(run, tmp_path):
    from msl_kit.files.download import sha256sum

    info = export(run, tmp_path / "m.pt2", onnx=False)
    assert info["checkpoint_sha256"] == sha256sum(run / "checkpoint.pt")
    assert info["onnx"] == "" and not (tmp_path / "m.onnx").exists()
    assert json.loads(json.dumps(info)) == json.loads((tmp_path / "m.json").read_text())
    assert info["files"] == {"m.pt2": sha256sum(tmp_path / "m.pt2")}
    assert info["load"] == "torch.export.load('m.pt2').module()"


# ------------------------------------------------- issue 24 items 3, 5 and 22: what is written
def _state(folder: Path) -> dict[str, str]:
    """Every entry of `folder` (hidden temp files too) with its content's digest."""
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.iterdir())
    }


def _export(capsys, ckpt: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out), *flags])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture()
def own_run(run, tmp_path):
    """A copy of the tiny run, so that a test that fails cannot spoil the shared one."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize(
    "case", ["run checkpoint", "a photo", "a zip", "a json of the user's", "another module's json"]
)
def test_3_export_never_replaces_a_file_it_did_not_write(own_run, tmp_path, capsys, case):
    """`--out RUN/checkpoint.pt` replaced the run's checkpoint (then evaluate refused it); a
    fixed model.json was overwritten by any export into the folder."""
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "model.pt2"
    if case == "run checkpoint":
        folder, out = own_run, own_run / "checkpoint.pt"
    elif case == "a photo":
        Image.new("RGB", (8, 8)).save(out, format="JPEG")
    elif case == "a zip":
        import zipfile

        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("archive/extra/notes.txt", "mine")
    elif case == "a json of the user's":
        (folder / "model.json").write_text('{"format": "my own notes"}')
    else:  # model.json describes model.pt, an export of its own
        assert _export(capsys, own_run, folder / "model.pt")[0] == 0
    before = _state(folder)
    rc, _, err = _export(capsys, own_run, out)
    line = _one_error_line(err)
    assert rc == 2 and "it is left alone" in line and "nothing written" in line
    assert _state(folder) == before  # byte for byte, no temp file


def test_3_a_description_is_named_after_its_module_and_no_path_is_printed_twice(
    run, tmp_path, capsys
):
    rc, text, _ = _export(capsys, run, tmp_path / "model.json")
    assert rc == 2 and not list(tmp_path.iterdir())  # refused in one line, nothing written
    onnx = [".onnx"] if exporting.onnx_wanted(None) else []  # where the onnx extra is installed
    for name in ("model.pt2", "lite.pt", "model.pt2"):  # the second model.pt2 replaces the first
        rc, text, _ = _export(capsys, run, tmp_path / name)
        assert rc == 0
        wrote = text.splitlines()[0].removeprefix("wrote ").split(", ")
        expected = [tmp_path / name] + [(tmp_path / name).with_suffix(s) for s in [".json", *onnx]]
        assert wrote == [str(p) for p in expected]
    names = [f"{stem}{s}" for stem in ("lite", "model") for s in [".json", *onnx]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "lite.pt", "model.pt2"])
    for module in ("model.pt2", "lite.pt"):
        info = json.loads((tmp_path / module).with_suffix(".json").read_text())
        assert info["module"] == module and info["description"] == f"{module.split('.')[0]}.json"


def _fake_onnx(monkeypatch, payload: bytes = b"onnx bytes") -> None:
    """ONNX as if the onnx package were installed (it is an optional extra)."""
    monkeypatch.setattr(exporting, "onnx_wanted", lambda onnx: onnx is not False)
    monkeypatch.setattr(exporting, "onnx_bytes", lambda model, example: payload)


def test_5_onnx_asked_for_without_onnx_changes_nothing(run, tmp_path, capsys, monkeypatch):
    """`export --onnx` without onnx replaced the .pt first, then failed: the old model.json
    then described another module."""
    folder = tmp_path / "exp"
    assert _export(capsys, run, folder / "model.pt")[0] == 0
    before = _state(folder)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as where it is absent
    rc, _, err = _export(capsys, run, folder / "model.pt", "--onnx")
    assert rc == 2 and "pip install onnx" in _one_error_line(err)
    assert _state(folder) == before
    rc, _, err = _export(capsys, run, tmp_path / "new" / "model.pt", "--onnx")
    assert rc == 2 and not (tmp_path / "new").exists()


def test_5_a_failure_at_any_file_leaves_the_old_export_whole(run, tmp_path, monkeypatch):
    """All files or none: the new module, ONNX file and description are written to temp files
    and renamed in only when all are complete; a failure at the module's write, the ONNX
    file's rename or the description's rename puts every old file back, and a new folder goes."""
    import errno

    from msl_kit.files import atomic

    old = tmp_path / "old"
    _fake_onnx(monkeypatch, b"old onnx")
    export(run, old / "model.pt")
    assert sorted(_state(old)) == ["model.json", "model.onnx", "model.pt"]
    before = _state(old)
    _fake_onnx(monkeypatch, b"new onnx")
    real = {"fsync": os.fsync, "replace": os.replace}
    calls = dict.fromkeys(real, 0)
    fail = ("fsync", 1)

    def failing(name):
        def call(*args):
            calls[name] += 1
            if (name, calls[name]) == fail:
                raise OSError(errno.EIO, "simulated")
            return real[name](*args)

        return call

    monkeypatch.setattr(atomic.os, "fsync", failing("fsync"))
    monkeypatch.setattr(atomic.os, "replace", failing("replace"))
    for fail in [("fsync", 1), ("replace", 2), ("replace", 3)]:  # noqa: B007 (read by `call`)
        for folder in (old, tmp_path / "fresh" / "deeper"):
            calls.update(fsync=0, replace=0)
            with pytest.raises(OSError, match="simulated"):
                export(run, folder / "model.pt")
            assert _state(old) == before
            assert not (tmp_path / "fresh").exists()  # the folders it made are gone too


def test_5_an_earlier_exports_onnx_goes_with_it_and_a_users_stays(run, tmp_path, monkeypatch):
    _fake_onnx(monkeypatch)
    export(run, tmp_path / "model.pt")
    monkeypatch.setattr(exporting, "onnx_wanted", lambda onnx: False)  # onnx uninstalled since
    export(run, tmp_path / "model.pt")
    assert not (tmp_path / "model.onnx").exists()  # it held the module just replaced
    (tmp_path / "lite.onnx").write_bytes(b"the user's own")
    export(run, tmp_path / "lite.pt")
    assert (tmp_path / "lite.onnx").read_bytes() == b"the user's own"
    _fake_onnx(monkeypatch)
    with pytest.raises(exporting.ExportError, match="lite.onnx exists"):
        export(run, tmp_path / "lite.pt")


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask 022", "umask 077"])
def test_22_run_files_and_exports_follow_the_umask(run, tmp_path, umask):
    """Every file was mode 0600 (mkstemp's): a group could not read a shared run or export."""
    current = os.umask(0o022)
    os.umask(current)
    for name in ("checkpoint.pt", "metrics.json", "config.yaml", "history.csv"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~current, name
    os.umask(umask)
    try:
        export(run, tmp_path / "model.pt")
    finally:
        os.umask(current)
    for name in ("model.pt", "model.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_torchscript_says_once_that_torch_export_is_recommended(run, tmp_path):
    """torch 2.9+ warns on torch.jit.trace, trace_method and save: one FutureWarning of the
    kit's replaces those three and says what to do; torch.export's .pt2 warns nothing."""
    import warnings

    def future_warnings(call) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        return [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]

    torch_warns = future_warnings(lambda: torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)))
    note = [exporting.TORCHSCRIPT_NOTE] if torch_warns else []
    assert future_warnings(lambda: export(run, tmp_path / "ts.pt", onnx=False)) == note
    assert future_warnings(lambda: export(run, tmp_path / "ep.pt2", onnx=False)) == []
