"""Take a trained model out of Python: `export(checkpoint, out)` -> TorchScript (+ ONNX).

The exported module eats what any image library gives after a resize and a centre crop: uint8
(N, C, S, S) in RGB order (C = 1 grey for "L" models), S the eval crop size. Colour order,
scaling and mean / std happen inside, with the same float32 multiply-add as the kit's eval
transform, so its outputs equal `embed`'s. `model.json` beside it says how to resize and crop.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from msl_kit.files.atomic import atomic_write_bytes, atomic_write_text
from msl_kit.files.download import sha256sum
from msl_kit.preprocessing import Preprocessing
from msl_kit.train import recipe
from msl_kit.train.checkpoint import load_model
from msl_kit.use.embedding import EmbedError, checkpoint_file

EXPORT_FORMAT = "msl-kit export 1"


def input_affine(spec: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,) in the model's channel order: x = u8 * scale + shift."""
    c = spec.channels
    mean = list(spec.mean) * c if len(spec.mean) == 1 else list(spec.mean)
    std = list(spec.std) * c if len(spec.std) == 1 else list(spec.std)
    scale = torch.tensor([spec.value_range / 255.0 / s for s in std], dtype=torch.float32)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
    return scale, shift


class UInt8Model(nn.Module):
    """uint8 RGB / grey (N, C, S, S) -> the model's L2-normalised embeddings."""

    def __init__(self, model: nn.Module, spec: Preprocessing) -> None:
        super().__init__()
        self.model = model
        scale, shift = input_affine(spec)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))
        self.bgr = spec.color == "BGR"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if self.bgr:  # the user gives RGB; the network was trained on BGR
            x = x.flip(1)
        return self.model(x * self.scale + self.shift)


def to_uint8(normalised: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """What the exported model eats, from the kit's eval-transformed (N, C, S, S) tensors:
    the normalisation undone, RGB order, uint8 (exact: the transform started from uint8)."""
    scale, shift = input_affine(spec)
    u8 = ((normalised - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)).round()
    u8 = u8.clamp(0, 255).to(torch.uint8)
    return u8.flip(1) if spec.color == "BGR" else u8


def describe(spec: Preprocessing, dim: int, ckpt: Path, sha: str) -> dict:
    """model.json: everything a user needs to feed the exported model without msl_kit."""
    channels = spec.channels
    colour = "grey" if channels == 1 else "RGB"
    return {
        "format": EXPORT_FORMAT,
        "input": {
            "dtype": "uint8",
            "shape": ["N", channels, spec.input_size, spec.input_size],
            "channels": channels,
            "colour": "L" if channels == 1 else "RGB",
        },
        "resize": {"shorter_side": spec.resize_size, "interpolation": "bilinear"},
        "crop": {"size": spec.input_size, "position": "center", "mode": spec.crop},
        "how": (
            f"resize so the shorter side is {spec.resize_size} px (bilinear), crop the centre "
            f"{spec.input_size} x {spec.input_size}, give uint8 {colour}"
            " as (N, C, S, S); the module does colour order, scaling and mean/std"
        ),
        "model_preprocessing": dataclasses.asdict(spec),
        "embedding_dim": dim,
        "output": "L2-normalised float32 (N, embedding_dim); rank by inner product",
        "checkpoint": str(ckpt),
        "checkpoint_sha256": sha,
    }


def export(checkpoint: str | Path, out: str | Path, *, onnx: bool | None = None) -> dict:
    """Write OUT (TorchScript), OUT's model.json and, where `onnx` imports (or onnx=True),
    OUT with suffix .onnx; returns model.json's content."""
    out = Path(out)
    if out.is_dir():
        raise EmbedError(f"--out {out} is a folder: give a file name such as {out}/model.pt")
    ckpt = checkpoint_file(checkpoint)
    model, cfg = load_model(ckpt)
    spec = recipe.preprocessing(cfg)
    wrapped = UInt8Model(model.float().to(memory_format=torch.contiguous_format), spec).eval()
    size = spec.input_size
    example = torch.randint(0, 256, (2, spec.channels, size, size), dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.9+ calls TorchScript deprecated; it is still the one format that loads with
        # plain `torch.jit.load` (no Python source, no msl_kit), which is what export promises.
        # The tracer warns about the model's input-shape check: a constant for a fixed C.
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, example, check_trace=False)
        dim = int(traced(example).shape[1])
        atomic_write_bytes(out, lambda f: torch.jit.save(traced, f))
    info = describe(spec, dim, ckpt, sha256sum(ckpt))
    info["torchscript"] = out.name
    info["onnx"] = write_onnx(wrapped, example, out.with_suffix(".onnx"), onnx)
    atomic_write_text(out.with_name("model.json"), json.dumps(info, indent=2) + "\n")
    return info


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, wanted: bool | None) -> str:
    """The ONNX file's name, or "" where the onnx package is absent and ONNX was not asked for."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        if wanted:
            raise EmbedError("ONNX export needs the onnx package: pip install onnx") from None
        return ""
    if wanted is False:
        return ""
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter (the newer one needs onnxscript too, a heavier extra);
        # torch deprecates it and parts of itself, none of which the user can act on
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}},
            dynamo=False,
        )
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path.name
