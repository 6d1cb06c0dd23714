"""Every file under a folder, following symbolic links that stay inside it: `walk(root)`.

A link (to a file or a folder) whose target lies inside `root` is followed and listed under
the link's own path, so a class folder that is a link keeps its name. A link that leaves
`root`, one that loops back to a folder it is inside, a second way into a folder already
listed, and a broken link are not followed: each is returned in `refused` with the reason,
so a caller can count and name them instead of dropping them silently. Hidden names (a
leading ".") are left out, as are the paths `skip` says are not inputs.
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

    def visit(folder: Path, ancestors: tuple[str, ...]) -> None:
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
                    visit(path, (*ancestors, real))
                else:
                    tree.files.append(path)
                continue
            target = os.path.realpath(path)
            why = _refusal(path, target, root_real, ancestors, seen)
            if why:
                tree.refused.append((path, why))
            elif os.path.isdir(target):
                seen[target] = path
                visit(path, (*ancestors, target))
            else:
                tree.files.append(path)

    visit(Path(root_real), (root_real,))
    return tree


def _refusal(
    path: Path, target: str, root: str, ancestors: tuple[str, ...], seen: dict[str, Path]
) -> str:
    """Why the link at `path` (to `target`) is not followed, or "" when it is."""
    if not os.path.exists(target):
        return f"a broken link (to {os.readlink(path)})"
    if not _inside(target, root):
        return f"a link that leaves {root} (to {target})"
    if target in ancestors:
        return f"a link that loops back to {seen.get(target, target)}"
    if os.path.isdir(target) and target in seen:
        return f"a second way into the folder {seen[target]}"
    return ""
