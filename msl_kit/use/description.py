"""An export's description (`model.json` beside `model.pt`): every step `embed` applies to an
image file before the exported module, as values and as the Pillow calls that reproduce it.

`embed` reads a file with `transforms.load_image` and the eval `ImageTransform`; a user who
follows this description with Pillow and numpy alone gets the same uint8 crop, so the module
gives `embed`'s vectors (tests/test_use_export.py checks it to 1e-4 in a process without
msl_kit, for both crop modes, transparency, 16-bit, palette, grey and JPEG files).
"""

from __future__ import annotations

import dataclasses

from msl_kit.datasets.transforms import ALPHA_BACKGROUND, ALPHA_MODES, SIXTEEN_BIT_MODES
from msl_kit.preprocessing import Preprocessing

FORMAT_FAMILY = "msl-kit export"  # every version's "format" starts so
EXPORT_FORMAT = f"{FORMAT_FAMILY} 2"  # 1: one fixed model.json, no decoding steps
LOADERS = {
    "torchscript": "torch.jit.load({name!r})",
    "torch.export": "torch.export.load({name!r}).module()",
}


def decode_steps(spec: Preprocessing) -> dict:
    """From a file to a Pillow image of the model's mode ("RGB" or "L"), in `embed`'s order."""
    mode = "L" if spec.channels == 1 else "RGB"
    side = spec.resize_size
    bg = list(ALPHA_BACKGROUND)
    return {
        "library": "Pillow",
        "mode": mode,
        "jpeg_draft": {
            "when": "the file is a JPEG (img.format == 'JPEG'), before img.load()",
            "size": [side, side],
            "pillow": f"img.draft({mode!r}, ({side}, {side}))",
            "why": "libjpeg decodes at the smallest 1/2, 1/4 or 1/8 scale keeping both sides "
            f">= {side}" + (", straight to grey" if mode == "L" else ""),
        },
        "then": f"nothing more if img.mode == {mode!r}; else the first that applies:",
        "sixteen_bit": {
            "modes": list(SIXTEEN_BIT_MODES),
            "pillow": "Image.fromarray(np.clip(np.asarray(img, np.float32) / 257.0 + 0.5, 0, "
            f"255).astype(np.uint8)).convert({mode!r})",
        },
        "alpha": {
            "modes": list(ALPHA_MODES),
            "also": "mode 'P' with 'transparency' in img.info",
            "background": bg,
            "pillow": f"Image.alpha_composite(Image.new('RGBA', img.size, {tuple(bg + [255])}), "
            f"img.convert('RGBA')).convert({mode!r})",
        },
        "other": {
            "pillow": f"img.convert({mode!r})",
            "note": "Pillow's conversion: palettes expanded; RGB to L is "
            "L = R * 299/1000 + G * 587/1000 + B * 114/1000",
        },
    }


def geometry_steps(spec: Preprocessing) -> tuple[dict, dict]:
    """The resize and the centre crop, with the exact integer arithmetic of both crop modes."""
    side, size = spec.resize_size, spec.input_size
    filt = f"Image.Resampling.{spec.interpolation.upper()}"
    resize = {
        "shorter_side": side,
        "interpolation": spec.interpolation,
        "pillow_filter": filt,
        "size": f"(w, h) = img.size; (rw, rh) = ({side}, int({side} * h / w)) if w <= h "
        f"else (int({side} * w / h), {side})",
    }
    crop = {
        "size": size,
        "position": "center",
        "mode": spec.crop,
        "left_top": f"left = round((rw - {size}) / 2); top = round((rh - {size}) / 2) "
        "(Python's round: halves to even)",
    }
    if spec.crop == "two_step":
        crop["pillow"] = (
            f"img = img.resize((rw, rh), {filt}) unless (rw, rh) == img.size; "
            f"img = img.crop((left, top, left + {size}, top + {size}))"
        )
    else:  # "fused": the crop box mapped back onto the source, one resampling
        crop["pillow"] = (
            f"img = img.resize(({size}, {size}), {filt}, box=(left * (w / rw), top * (h / rh), "
            f"(left + {size}) * (w / rw), (top + {size}) * (h / rh)))"
        )
    return resize, crop


def how_line(spec: Preprocessing) -> str:
    """One line for a person: the steps in order (the description has the exact arithmetic)."""
    mode = "L" if spec.channels == 1 else "RGB"
    side, size = spec.resize_size, spec.input_size
    how = spec.interpolation
    if spec.crop == "two_step":
        crop = f"resize ({how}) so the shorter side is {side} px, crop the centre {size} x {size}"
    else:
        crop = (
            f"crop the centre {size} x {size} of the image resized to a {side} px shorter side, "
            f"in one {how} resampling (Pillow's resize with box=)"
        )
    background = "white" if ALPHA_BACKGROUND == (255, 255, 255) else str(ALPHA_BACKGROUND)
    return (
        f"with Pillow: decode (JPEG: draft to >= {side} px), transparency onto {background}, "
        f"16-bit / 257, convert to {mode}; {crop}; give uint8 {mode} as (N, C, S, S); the "
        "module does colour order, scaling and mean/std"
    )


def describe(
    spec: Preprocessing, dim: int, module: str, module_format: str, description: str
) -> dict:
    """The description of an exported module (without the checkpoint and file digests, which
    `export` adds): input, decoding, resize, crop, output."""
    channels = spec.channels
    resize, crop = geometry_steps(spec)
    return {
        "format": EXPORT_FORMAT,
        "module": module,
        "module_format": module_format,
        "description": description,
        "load": LOADERS[module_format].format(name=module),
        "input": {
            "dtype": "uint8",
            "layout": "NCHW",
            "shape": ["N", channels, spec.input_size, spec.input_size],
            "channels": channels,
            "colour": "L" if channels == 1 else "RGB",
            "channel_order": "L" if channels == 1 else "RGB",
            "from_pillow": "np.asarray(img): (S, S) grey -> (1, S, S); (S, S, 3) -> "
            "transpose(2, 0, 1); stack N of them",
        },
        "decode": decode_steps(spec),
        "resize": resize,
        "crop": crop,
        "how": how_line(spec),
        "model_preprocessing": dataclasses.asdict(spec),
        "embedding_dim": dim,
        "output": "L2-normalised float32 (N, embedding_dim); rank by inner product",
    }
