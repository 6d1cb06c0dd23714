"""Every file under a folder, following its symbolic links: `walk(root)`.

A link is followed and listed under its own path, so a class folder that is a link keeps its
name. A folder link directly in `root` (`photos/cats -> /data/cats`, a class kept on another
disk: torchvision's ImageFolder follows it too) is followed wherever it points, and its target
becomes that class's tree. Deeper down, a link that leaves the tree it is in (`root`, or the
class folder's target), one that loops back to a folder it is inside, a second way into a
folder already listed, and a broken link are not followed: each is returned in `refused` with
the reason, so a caller can count and name them instead of dropping them silently. Hidden
names (a leading ".") are left out, as are the paths `skip` says are not inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tree:
    """What `walk` found: files in sorted walk order, and refused entries with their reason."""

    files: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def printable(name: str | Path) -> str:
    """A file name as text any terminal or UTF-8 file takes: bytes that are not UTF-8 (kept as
    surrogate escapes by Python, so the name still opens the file) are shown as \\xNN."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk(root: str | Path, skip: Callable[[Path], bool] | None = None) -> Tree:
    """Files under `root` (itself resolved first), depth first in name order."""
    root_real = os.path.realpath(root)
    tree, seen = Tree(), {root_real: Path(root_real)}

    def visit(folder: Path, ancestors: tuple[str, ...], within: str) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith(".") or (skip is not None and skip(path)):
                continue
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    real = os.path.join(ancestors[-1], entry.name)
                    seen[real] = path
                    visit(path, (*ancestors, real), within)
                else:
                    tree.files.append(path)
                continue
            target = os.path.realpath(path)
            top_folder = len(ancestors) == 1 and os.path.isdir(target)  # a class folder
            why = _refusal(path, target, "" if top_folder else within, ancestors, seen)
            if why:
                tree.refused.append((path, why))
            elif os.path.isdir(target):
                seen[target] = path
                visit(path, (*ancestors, target), target if top_folder else within)
            else:
                tree.files.append(path)

    visit(Path(root_real), (root_real,), root_real)
    return tree


def _refusal(
    path: Path, target: str, within: str, ancestors: tuple[str, ...], seen: dict[str, Path]
) -> str:
    """Why the link at `path` (to `target`) is not followed, or "" when it is; `within` is the
    tree the link must stay in ("" for a class-folder link, which may point anywhere)."""
    if not os.path.exists(target):
        return f"a broken link (to {os.readlink(path)})"
    if within and not _inside(target, within):
        return f"a link that leaves {within} (to {target})"
    if os.path.isdir(target) and any(_inside(a, target) for a in ancestors):
        return f"a link that loops back to {seen.get(target, target)}"
    if os.path.isdir(target) and target in seen:
        return f"a second way into the folder {seen[target]}"
    return ""
