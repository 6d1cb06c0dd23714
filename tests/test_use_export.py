"""`msl-kit export`: a TorchScript module that, in a process without msl_kit, turns uint8 crops
made from model.json into the vectors `embed` writes (within 1e-4); colour order inside."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _fixtures_use import held_out_tree, tiny_run
from PIL import Image

from msl_kit import cli
from msl_kit.datasets import transforms
from msl_kit.preprocessing import Preprocessing
from msl_kit.use.embedding import embed
from msl_kit.use.exporting import UInt8Model, to_uint8

# Runs with no msl_kit on the path: resize + centre crop from model.json with PIL alone.
OUTSIDE = """
import json, sys
import numpy as np, torch
from PIL import Image
folder, paths = sys.argv[1], sys.argv[2:]
meta = json.load(open(f"{folder}/model.json"))
side, crop = meta["resize"]["shorter_side"], meta["crop"]["size"]
mode = "L" if meta["input"]["channels"] == 1 else "RGB"
batch = []
for p in paths:
    img = Image.open(p).convert(mode)
    w, h = img.size
    rw, rh = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    left, top = round((rw - crop) / 2), round((rh - crop) / 2)
    a = np.asarray(img.crop((left, top, left + crop, top + crop)))
    batch.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
model = torch.jit.load(f"{folder}/{meta['torchscript']}")
with torch.no_grad():
    out = model(torch.from_numpy(np.stack(batch)))
np.save(f"{folder}/outside.npy", out.numpy())
assert "msl_kit" not in sys.modules
"""


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


def test_exported_model_equals_embed_in_a_process_without_msl_kit(run, tmp_path_factory, tmp_path):
    _, written = held_out_tree(tmp_path_factory.getbasetemp(), limit=60)
    out = tmp_path / "exp" / "model.pt"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert meta["input"] == {
        "dtype": "uint8",
        "shape": ["N", 1, 28, 28],
        "channels": 1,
        "colour": "L",
    }
    assert meta["resize"]["shorter_side"] == 28 and meta["crop"]["size"] == 28
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", OUTSIDE, str(out.parent), *written],
        cwd=tmp_path,  # not the repository: msl_kit cannot be imported from here
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    outside = np.load(out.parent / "outside.npy")
    (tmp_path / "l.csv").write_text("\n".join(written) + "\n")
    ref = embed(run, tmp_path / "l.csv", progress=False)
    assert list(ref.paths) == written
    np.testing.assert_allclose(outside, ref.embeddings, atol=1e-4, rtol=0)
    assert np.abs(np.linalg.norm(outside, axis=1) - 1).max() < 1e-5
    if meta["onnx"]:
        assert (out.parent / meta["onnx"]).stat().st_size > 10_000


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
    out = tmp_path / "model.pt"
    cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--onnx"])
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    onnx_out = ort.InferenceSession(str(out.with_suffix(".onnx"))).run(None, {"images": x})[0]
    ts_out = torch.jit.load(str(out))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(onnx_out, ts_out, atol=1e-5)


def test_model_json_names_the_checkpoint(run, tmp_path):
    from msl_kit.files.download import sha256sum
    from msl_kit.use.exporting import export

    info = export(run, tmp_path / "m.pt", onnx=False)
    assert info["checkpoint_sha256"] == sha256sum(run / "checkpoint.pt")
    assert info["onnx"] == "" and not (tmp_path / "m.onnx").exists()
