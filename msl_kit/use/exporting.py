"""Take a trained model out of Python: `export(checkpoint, out)` -> a module + its description.

The module eats what Pillow gives after the steps its description lists: uint8 (N, C, S, S) in
RGB order (C = 1 grey for "L" models), S the eval crop size. Colour order, scaling and mean /
std happen inside, with the same float32 multiply-add as the kit's eval transform, so its
outputs equal `embed`'s. `--out`'s suffix picks the format: `.pt2` is torch.export's (what torch
recommends: `torch.export.load(path).module()`), `.pt` TorchScript (`torch.jit.load`, also from
C++; torch deprecates it). The description is named after the module (`lite.pt` -> `lite.json`),
and ONNX (`lite.onnx`) is added where the onnx package imports.

Nothing is written until every output path is checked: each is new or an earlier export of
this same `--out` (a checkpoint, a photo, another module's description is never replaced).
The files are then written all or none.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msl_kit.errors import MslKitError
from msl_kit.files.atomic import atomic_write_files
from msl_kit.files.download import sha256sum
from msl_kit.models.head import EmbeddingModel
from msl_kit.preprocessing import Preprocessing
from msl_kit.train import recipe
from msl_kit.train.checkpoint import load_model
from msl_kit.use.description import FORMAT_FAMILY, describe
from msl_kit.use.embedding import checkpoint_file

FORMATS = {".pt2": "torch.export", ".pt": "torchscript"}
MARKER = "msl_kit_export.json"  # inside the module's archive: its description, minus digests
TORCHSCRIPT_NOTE = (
    "torch deprecates TorchScript (.pt): torch.jit.load prints a FutureWarning and a later torch "
    "may drop it. Export to NAME.pt2 (torch.export; load with torch.export.load(path).module()) "
    "unless you need libtorch in C++ or an older torch"
)


class ExportError(MslKitError, ValueError):
    """An export that cannot be written as asked; nothing was written."""


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


@dataclass
class Targets:
    """An export's paths: module, description, ONNX file (None: not written), and an earlier
    export's ONNX file that the new set drops (removed with the commit)."""

    module: Path
    description: Path
    onnx: Path | None
    stale: tuple[Path, ...] = ()


def module_format(out: Path) -> str:
    """The module's format from `--out`'s suffix (.pt2: "torch.export", .pt: "torchscript");
    a folder or another suffix is one error line."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder: give a file name such as {out}/model.pt2")
    if out.suffix not in FORMATS:
        raise ExportError(
            f"--out {out.name!r} is not a module's name: give NAME.pt2 (torch.export) or NAME.pt "
            "(TorchScript); its description NAME.json is written beside it (nothing written)"
        )
    if out.suffix == ".pt2" and not hasattr(getattr(torch, "export", None), "Dim"):
        raise ExportError(
            f"torch {torch.__version__} cannot write torch.export's .pt2; use .pt or a newer torch"
        )
    return FORMATS[out.suffix]


def onnx_wanted(onnx: bool | None) -> bool:
    """Whether ONNX is written: asked (True: the onnx package must import), refused (False),
    or None: where onnx imports. Checked before anything is written."""
    if onnx is False:
        return False
    try:
        import onnx as _onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        if onnx:
            raise ExportError(
                "ONNX export needs the onnx package: pip install onnx (nothing written)"
            ) from None
        return False
    return True


def description_of(data: bytes) -> dict | None:
    """The export description these bytes hold (any format version), or None."""
    try:
        info = json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        return None
    ours = isinstance(info, dict) and str(info.get("format", "")).startswith(FORMAT_FAMILY)
    return info if ours else None


def read_description(path: Path) -> dict | None:
    """The export description in file `path`, or None where it holds none."""
    try:
        return description_of(path.read_bytes())
    except OSError:
        return None


def is_export_module(path: Path) -> bool:
    """A TorchScript or torch.export archive that `export` wrote (MARKER inside)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(f"/extra/{MARKER}")]
            return bool(names) and description_of(zf.read(names[0])) is not None
    except (OSError, zipfile.BadZipFile, KeyError):
        return False


def _names(info: dict | None, out: Path) -> bool:
    """Whether a description is that of a module named like `out` (export 1 said "torchscript")."""
    return bool(info) and out.name in (info.get("module"), info.get("torchscript"))


def earlier_export(out: Path) -> tuple[Path, dict] | None:
    """The description of an earlier export to this same `out`, and its path: OUT.json naming
    OUT, or an export 1 model.json naming it (that format had one fixed name)."""
    for path in (out.with_suffix(".json"), out.with_name("model.json")):
        info = read_description(path) if path.is_file() else None
        if _names(info, out):
            return path, info
    return None


def _refuse(path: Path, why: str) -> ExportError:
    return ExportError(
        f"{path} exists and {why}; it is left alone: choose another --out (nothing written)"
    )


def check_targets(out: Path, onnx: bool) -> Targets:
    """Every path the export would write, each new or an earlier export's to this same `out`;
    the first other file is one error, before anything is written."""
    desc, onnx_path = out.with_suffix(".json"), out.with_suffix(".onnx")
    for path in (out, desc, onnx_path):
        if path.is_dir():
            raise _refuse(path, "is a folder")
    above = next(p for p in out.parents if p.exists())  # "." at the latest
    if not above.is_dir():
        raise _refuse(above, "is a file, so no folder can be made below it")
    earlier_path, earlier = earlier_export(out) or (None, None)
    legacy = earlier is not None and earlier.get("format") == "msl-kit export 1"
    if out.exists() and not (is_export_module(out) or legacy):
        raise _refuse(out, "was not written by msl-kit export (a checkpoint? a file of yours?)")
    if desc.exists() and not _names(read_description(desc), out):
        other = read_description(desc)
        named = other and (other.get("module") or other.get("torchscript"))
        why = f"describes another export ({named})" if named else "is not an export's description"
        raise _refuse(desc, why)
    stale = [earlier_path] if legacy and earlier_path != desc else []
    if onnx_path.exists():
        ours = earlier is not None and _listed(earlier, onnx_path)
        if onnx and not ours:
            raise _refuse(onnx_path, "was not written by an earlier export to this --out")
        if ours and not onnx:  # it holds the module being replaced: it goes with it
            stale.append(onnx_path)
    return Targets(out, desc, onnx_path if onnx else None, tuple(stale))


def _listed(info: dict, path: Path) -> bool:
    """Whether an earlier description lists `path` as its ONNX file (with its digest, from
    format 2 on)."""
    if info.get("onnx") != path.name:
        return False
    digest = info.get("files", {}).get(path.name)
    return digest is None or digest == sha256sum(path)


def _replay(seen: list[warnings.WarningMessage]) -> bool:
    """Re-issue the warnings torch gave while tracing, but two: TorchScript's deprecation (one
    note with what to do replaces it; returns whether torch gave it) and the tracer's note that
    the kit's own input-shape check became a constant (harmless: the module's C is fixed). A
    backbone's own tracer warnings (a data-dependent branch in a plugin) still reach the user."""
    deprecated = False
    head = inspect.getsourcefile(EmbeddingModel)
    for w in seen:
        if issubclass(w.category, FutureWarning) and str(w.message).startswith("`torch.jit"):
            deprecated = True
        elif not (issubclass(w.category, torch.jit.TracerWarning) and w.filename == head):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return deprecated


def torchscript_bytes(wrapped: nn.Module, example: torch.Tensor, marker: str) -> bytes:
    """The traced module as TorchScript, MARKER inside."""
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        traced = torch.jit.trace(wrapped, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={MARKER: marker})
    if _replay(seen):
        warnings.warn(TORCHSCRIPT_NOTE, FutureWarning, stacklevel=3)
    return buf.getvalue()


def program_bytes(wrapped: nn.Module, example: torch.Tensor, marker: str) -> bytes:
    """The module as a torch.export program (any batch size), MARKER inside."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={MARKER: marker})
    return buf.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The module as ONNX (torch's TorchScript-based exporter: the newer one needs onnxscript,
    a heavier extra)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}},
            dynamo=False,
        )
    # torch deprecates this exporter and parts of itself in DeprecationWarnings nobody can act
    # on (the alternative needs onnxscript); the rest are replayed
    _replay([w for w in seen if not issubclass(w.category, DeprecationWarning)])
    return buf.getvalue()


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; return those created (removed again on failure)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    for p in missing:
        p.mkdir()
    return missing


def export(checkpoint: str | Path, out: str | Path, *, onnx: bool | None = None) -> dict:
    """Write OUT (`.pt2`: torch.export, `.pt`: TorchScript), its description OUT.json and, where
    `onnx` imports (or onnx=True), OUT.onnx, all or none; returns the description.

    Every output path and the onnx package are checked before the first byte is written; a
    path that exists must be an earlier export to this same OUT.
    """
    out = Path(out)
    kind = module_format(out)
    targets = check_targets(out, onnx_wanted(onnx))
    ckpt = checkpoint_file(checkpoint)
    model, cfg = load_model(ckpt)
    spec = recipe.preprocessing(cfg)
    wrapped = UInt8Model(model.float().to(memory_format=torch.contiguous_format), spec).eval()
    size = spec.input_size
    example = torch.randint(0, 256, (2, spec.channels, size, size), dtype=torch.uint8)
    with torch.no_grad():
        dim = int(wrapped(example).shape[1])
    info = describe(spec, dim, out.name, kind, targets.description.name)
    info.update(checkpoint=str(ckpt.resolve()), checkpoint_sha256=sha256sum(ckpt))
    marker = json.dumps(info, indent=1)
    with torch.no_grad():
        blobs = {
            out: (torchscript_bytes if kind == "torchscript" else program_bytes)(
                wrapped, example, marker
            )
        }
        if targets.onnx is not None:
            blobs[targets.onnx] = onnx_bytes(wrapped, example)
    info["onnx"] = targets.onnx.name if targets.onnx else ""
    info["files"] = {p.name: hashlib.sha256(b).hexdigest() for p, b in blobs.items()}
    blobs[targets.description] = (json.dumps(info, indent=2) + "\n").encode()
    created = _make_folder(out.parent)
    try:  # the description last: it records the others' digests
        atomic_write_files(
            {p: (lambda f, b=b: f.write(b)) for p, b in blobs.items()}, targets.stale
        )
    except BaseException:
        for folder in reversed(created):
            folder.rmdir()
        raise
    return info
