"""Embed your own images with a trained checkpoint: `embed(checkpoint, images, out)`.

The model and its eval transform come from the checkpoint exactly as `msl-kit evaluate` builds
them (stored config -> `recipe`), and batches are cut as `evaluation.extract` cuts them, so the
vectors are the ones evaluate scores. Vectors stream to OUT.part/ in chunks, each written
atomically; a rerun after an interrupt embeds only the missing chunks, and the final file is
assembled from the chunks without holding them all, with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from msl_kit.datasets import transforms
from msl_kit.datasets.dataset import build
from msl_kit.datasets.layouts.official import natural
from msl_kit.files.atomic import atomic_write_bytes
from msl_kit.files.download import sha256sum
from msl_kit.train import engine, evaluation, recipe
from msl_kit.use.ann.spec import vectors_sha256
from msl_kit.use.index import FORMAT, Embeddings, is_index, write_npz

CHUNK_SIZE = 4096  # images per resumable piece: 8 MiB of 512-d vectors
SHOWN = 3  # skipped files named in the message


class EmbedError(ValueError):
    """A problem with what the user asked to embed; the message says what to do."""


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's checkpoint.pt."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


@dataclass
class ImageList:
    """What to embed: one path (or dataset item name) per image, labels where known."""

    paths: list[str]
    labels: np.ndarray | None
    classes: list[str]
    dataset: Dataset | None = None  # a prepared split: items are loaded from it by index
    where: str = ""


def _labelled(paths: list[str], names: list[str] | None, where: str) -> ImageList:
    if names is None:
        return ImageList(paths, None, [], where=where)
    classes = sorted(set(names), key=natural)
    index = {c: i for i, c in enumerate(classes)}
    return ImageList(
        paths, np.array([index[n] for n in names], dtype=np.int64), classes, None, where
    )


def _files(folder: Path) -> list[Path]:
    """Every visible file under `folder`, sorted (non-images too: they are reported as skipped)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def folder_images(folder: Path) -> ImageList:
    """A folder of class sub-folders (labels = folder names) or a flat folder (no labels)."""
    folder = folder.resolve()
    top = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    files = _files(folder)
    if top or not files:  # a flat folder (images at its top): every file, no labels
        return _labelled([str(p) for p in files], None, str(folder))
    names = [p.relative_to(folder).parts[0] for p in files]
    return _labelled([str(p) for p in files], names, str(folder))


def csv_images(path: Path) -> ImageList:
    """A CSV of `path[,label]` rows (a header row is optional; paths relative to the CSV)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    widths = {len(r) for r in rows}
    if not widths <= {1, 2} or len(widths) > 1:
        raise EmbedError(f"{path}: every row must be 'path' or every row 'path,label'")
    base = path.resolve().parent
    paths = [str((base / r[0].strip()).resolve()) for r in rows]
    names = [r[1].strip() for r in rows] if widths == {2} else None
    return _labelled(paths, names, str(path))


def dataset_images(name: str, root: str | None, split: str, transform: Callable) -> ImageList:
    """A prepared dataset split (`datasets.build`); items are named "<name>:<path or index>"."""
    ds = build(name, root, split, transform)
    paths = [f"{name}:{p or i}" for i, p in enumerate(getattr(ds, "paths", [""] * len(ds)))]
    if hasattr(ds, "root") and str(ds.root) != ".":
        paths = [str((ds.root / p).resolve()) for p in ds.paths]  # real files: searchable, shown
    return ImageList(paths, np.asarray(ds.labels), list(ds.classes), ds, f"{name}/{split}")


def image_list(
    images: str | Path | None, *, dataset: str | None, root: str | None, split: str, transform
) -> ImageList:
    """The images named by a folder, a CSV file, one image file, or a prepared dataset split."""
    if dataset is not None:
        return dataset_images(dataset, root, split, transform)
    if images is None:
        raise EmbedError("say what to embed: a folder, a CSV file of path[,label], or --dataset")
    path = Path(images).expanduser()
    if path.is_dir():
        return folder_images(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        return csv_images(path)
    if path.is_file():
        return _labelled([str(path.resolve())], None, str(path))
    raise EmbedError(f"no such folder or file: {path}")


class Tolerant(Dataset):
    """Items (tensor or None, index): a file that cannot be decoded becomes None, not an error."""

    def __init__(self, items: ImageList, transform: transforms.ImageTransform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        try:
            if self.items.dataset is not None:
                return self.items.dataset[index][0], index
            image = transforms.load_image(self.items.paths[index], *self.transform.load_hint)
            return self.transform(image), index
        except (transforms.CorruptImageError, OSError):
            return None, index


def collate_kept(batch: list) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """Stack the decoded images; return their indices and those of the files that failed."""
    kept = [(x, i) for x, i in batch if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, [i for _, i in kept], [i for x, i in batch if x is None]


def chunk_batches(chunks: Sequence[range], batch_size: int) -> Iterator[list[int]]:
    """Batches of `batch_size` consecutive indices that never cross a chunk's end."""
    for chunk in chunks:
        for start in range(chunk.start, chunk.stop, batch_size):
            yield list(range(start, min(start + batch_size, chunk.stop)))


def _fingerprint(sha: str, items: ImageList, spec: dict, opts, chunk: int) -> str:
    how = dataclasses.asdict(dataclasses.replace(opts, workers=0))  # workers change no vector
    digest = hashlib.sha256(json.dumps([sha, spec, how, chunk]).encode())
    for p in items.paths:
        digest.update(p.encode() + b"\0")
        if items.dataset is None:  # a file replaced at the same path is new input
            try:
                st = os.stat(p)
                digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:  # unreadable now: skipped (and counted) when embedded
                pass
    if items.labels is not None:
        digest.update(items.labels.astype("<i8").tobytes() + "\0".join(items.classes).encode())
    return digest.hexdigest()


@dataclass
class Job:
    """One embedding job: the model, how it reads images, what to embed and where to."""

    model: torch.nn.Module
    device: torch.device
    opts: evaluation.EvalOptions
    transform: transforms.ImageTransform
    items: ImageList
    checkpoint: Path
    sha: str
    spec: dict
    chunk: int
    fingerprint: str


def prepare_job(
    checkpoint: str | Path,
    images: str | Path | None,
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Job:
    """Load the checkpoint's model and eval transform as `evaluate` does; list the images."""
    path = checkpoint_file(checkpoint)
    model, cfg = engine.load_model(path)
    dev = recipe.pick_device(device or cfg.device)
    model.to(dev)
    spec = recipe.preprocessing(cfg)
    tf = transforms.build_transform(spec, train=False)
    opts = recipe.eval_options(cfg)
    opts = dataclasses.replace(
        opts,
        batch_size=batch_size or opts.batch_size,
        workers=opts.workers if workers is None else workers,
    )
    items = image_list(images, dataset=dataset, root=root, split=split, transform=tf)
    if not items.paths:
        raise EmbedError(f"no files to embed in {items.where or images}")
    # whole batches per chunk: batches then fall where evaluate's fall (same vectors)
    chunk = max(1, -(-chunk_size // opts.batch_size)) * opts.batch_size
    sha = sha256sum(path)
    spec_d = dataclasses.asdict(spec)
    fp = _fingerprint(sha, items, spec_d, opts, chunk)
    return Job(model.eval(), dev, opts, tf, items, path, sha, spec_d, chunk, fp)


@torch.no_grad()
def _embed_chunk(job: Job, batch: tuple) -> tuple[np.ndarray, list[int], list[int]]:
    images, kept, failed = batch
    if images is None:
        return np.zeros((0, 0), np.float32), kept, failed
    images = images.to(job.device, non_blocking=True)
    if job.opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with evaluation.autocast(job.opts.amp, job.device):
        return job.model(images).float().cpu().numpy(), kept, failed


def _save_shard(path: Path, emb: list, kept: list, failed: list, dim: int) -> None:
    vectors = np.concatenate(emb) if emb else np.zeros((0, dim), np.float32)

    def write(f) -> None:
        np.savez(
            f, embeddings=vectors, kept=np.array(kept, np.int64), failed=np.array(failed, np.int64)
        )

    atomic_write_bytes(path, write)


def run_chunks(job: Job, part: Path, progress: bool = True) -> None:
    """Embed every chunk that OUT.part/ lacks, one atomically written shard per chunk."""
    from tqdm.auto import tqdm

    n = len(job.items.paths)
    chunks = [range(s, min(s + job.chunk, n)) for s in range(0, n, job.chunk)]
    missing = [c for c in chunks if not (part / f"chunk_{c.start // job.chunk:06d}.npz").is_file()]
    done = n - sum(len(c) for c in missing)
    loader = DataLoader(
        Tolerant(job.items, job.transform),
        batch_sampler=list(chunk_batches(missing, job.opts.batch_size)),
        num_workers=job.opts.workers,
        collate_fn=collate_kept,
        pin_memory=job.device.type == "cuda",
    )
    bar = tqdm(total=n, initial=done, desc="embed", unit="img", disable=not progress)
    emb, kept, failed, dim = [], [], [], 0
    todo = iter(missing)
    current = next(todo, None)
    try:
        for batch in loader:
            vectors, k, f = _embed_chunk(job, batch)
            if len(k):
                emb.append(vectors)
                dim = vectors.shape[1]
            kept += k
            failed += f
            bar.update(len(k) + len(f))
            if len(kept) + len(failed) == len(current):  # the chunk is complete: keep it
                name = f"chunk_{current.start // job.chunk:06d}.npz"
                _save_shard(part / name, emb, kept, failed, dim)
                emb, kept, failed = [], [], []
                current = next(todo, None)
    finally:
        bar.close()


def _read_shards(part: Path) -> list[Path]:
    return sorted(part.glob("chunk_*.npz"))


def assemble(job: Job, part: Path, out: Path) -> None:
    """OUT.npz from the shards in order: vectors streamed through a .npy on disk."""
    shards = _read_shards(part)
    kept, failed, dim = [], [], 0
    for s in shards:
        with np.load(s) as z:
            kept.append(z["kept"])
            failed.append(z["failed"])
            dim = max(dim, z["embeddings"].shape[1] if len(z["kept"]) else 0)
    kept_all, failed_all = np.concatenate(kept), np.concatenate(failed)
    if not len(kept_all):
        raise EmbedError(
            f"none of the {len(failed_all)} file(s) in {job.items.where} is a readable image"
        )
    vectors = part / "embeddings.npy"
    mm = np.lib.format.open_memmap(vectors, "w+", np.float32, (len(kept_all), dim))
    row = 0
    for s in shards:
        with np.load(s) as z:
            block = z["embeddings"]
            if len(z["kept"]):
                mm[row : row + len(block)] = block
                row += len(block)
    mm.flush()
    digest = vectors_sha256(mm)  # what a faiss index beside the file is tied to
    del mm
    items = job.items
    members = [("embeddings", vectors), ("paths", np.array(items.paths)[kept_all])]
    if items.labels is not None:
        members += [("labels", items.labels[kept_all]), ("classes", np.array(items.classes))]
    members += [
        ("skipped", np.array([items.paths[i] for i in failed_all], dtype=str)),
        ("checkpoint", np.array(str(job.checkpoint))),
        ("checkpoint_sha256", np.array(job.sha)),
        ("preprocessing", np.array(json.dumps(job.spec, sort_keys=True))),
        ("inputs_sha256", np.array(job.fingerprint)),
        ("embeddings_sha256", np.array(digest)),
        ("format", np.array(FORMAT)),
    ]
    atomic_write_bytes(out, lambda f: write_npz(f, members))


def _start_part(job: Job, part: Path) -> None:
    """OUT.part/ for this job: kept when it holds this same job, else started afresh."""
    manifest = part / "job.json"
    if part.is_dir():
        same = manifest.is_file() and json.loads(manifest.read_text()).get("job") == job.fingerprint
        if same:
            for tmp in part.glob(".*.tmp"):  # a write cut short by a kill
                tmp.unlink()
            return
        print(f"{part} holds another job's pieces: starting over", file=sys.stderr)
        shutil.rmtree(part)
    part.mkdir(parents=True)
    atomic_write_bytes(manifest, lambda f: f.write(json.dumps({"job": job.fingerprint}).encode()))


def check_out(out: Path) -> None:
    """Refuse to replace a file that is not an embeddings file (a photo, a checkpoint...)."""
    if out.is_dir():
        raise EmbedError(f"--out {out} is a folder: give a file name such as {out}/images.npz")
    if out.exists() and not is_index(out):
        raise EmbedError(
            f"{out} exists and is not an embeddings file: choose another --out (nothing replaced)"
        )
    if out.suffix != ".npz":
        raise EmbedError(f"--out must end in .npz, not {out.name!r}")


def embed(
    checkpoint: str | Path,
    images: str | Path | None = None,
    out: str | Path | None = None,
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> Embeddings:
    """Embeddings of a folder, CSV or image, or of a prepared split (`dataset=`, `split=`),
    by a checkpoint's model (a checkpoint file or a run folder), written to `out` (FILE.npz)
    when given. Rerunning after an interrupt embeds only what OUT.part/ lacks; an up-to-date
    `out` is read, not redone. batch_size / workers / device default to the run's own.
    """
    options = dict(
        dataset=dataset,
        root=root,
        split=split,
        batch_size=batch_size,
        workers=workers,
        device=device,
        chunk_size=chunk_size,
    )
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            return embed(checkpoint, images, Path(tmp) / "e.npz", progress=progress, **options)
    out = Path(out)
    check_out(out)
    job = prepare_job(checkpoint, images, **options)
    if out.exists():
        done = Embeddings.load(out)
        if done.inputs_sha256 == job.fingerprint:
            return done  # already done: the same job wrote it
    part = out.with_name(out.name + ".part")
    _start_part(job, part)
    run_chunks(job, part, progress)
    assemble(job, part, out)
    shutil.rmtree(part)
    return Embeddings.load(out)
