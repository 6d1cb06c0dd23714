"""Embed your own images with a trained checkpoint: `embed(checkpoint, images, out)`.

The model and its eval transform come from the checkpoint exactly as `msl-kit evaluate` builds
them (stored config -> `recipe`), and batches are cut as `evaluation.extract` cuts them, so the
vectors are the ones evaluate scores. Vectors stream to OUT.part/ in chunks, each written
atomically; a rerun after an interrupt embeds only the missing chunks, and the final file is
assembled from the chunks without holding them all, with the same bytes as an uninterrupted run.
OUT is locked while it is written (as a run folder is: `rundir.take_lock`), and an existing
OUT counts as up to date only when it holds every input of the same job.
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
from msl_kit.errors import MslKitError
from msl_kit.files import tree
from msl_kit.files.atomic import atomic_write_bytes
from msl_kit.files.download import sha256sum
from msl_kit.train import evaluation, recipe
from msl_kit.train.checkpoint import load_model
from msl_kit.train.rundir import RunFolder, take_lock
from msl_kit.use import outputs
from msl_kit.use.ann.spec import vectors_sha256
from msl_kit.use.index import FORMAT, Embeddings, IndexFileError, write_npz

CHUNK_SIZE = 4096  # images per resumable piece: 8 MiB of 512-d vectors
SHOWN = 3  # skipped files named in the message
JOB_VERSION = "embed 2"  # in the fingerprint: pieces of an older layout are not mixed in


class EmbedError(MslKitError, ValueError):
    """A problem with what the user asked to embed; the message says what to do."""


def check_options(
    batch_size: int | None = None, workers: int | None = None, chunk_size: int = CHUNK_SIZE
) -> None:
    """Refuse, in one line, a numeric option out of range (before anything is written):
    batch_size >= 1 (None: the run's eval.batch_size), workers >= 0 (0: images are read in
    this process; None: the run's), chunk_size >= 1."""
    for flag, value, low, none in (
        ("--batch-size", batch_size, 1, "the run's eval.batch_size"),
        ("--workers", workers, 0, "the run's eval.workers"),
        ("--chunk-size", chunk_size, 1, ""),
    ):
        if value is None and none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            default = f"; leave it out for {none}" if none else ""
            zero = " (0 reads the images in this process)" if low == 0 else ""
            raise EmbedError(f"{flag} must be an integer >= {low}{zero}, got {value!r}{default}")


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's checkpoint.pt."""
    return RunFolder.checkpoint_of(path)


@dataclass
class ImageList:
    """What to embed: one path (or dataset item name) per image, labels where known, and the
    entries that were refused before embedding (a link leaving the folder, ...) with why."""

    paths: list[str]
    labels: np.ndarray | None
    classes: list[str]
    dataset: Dataset | None = None  # a prepared split: items are loaded from it by index
    where: str = ""
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _labelled(
    paths: list[str], names: list[str] | None, where: str, refused: list | None = None
) -> ImageList:
    refused = refused or []
    if names is None:
        return ImageList(paths, None, [], where=where, refused=refused)
    classes = sorted(set(names), key=natural)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    return ImageList(paths, labels, classes, None, where, refused)


def folder_images(folder: Path) -> ImageList:
    """A folder of class sub-folders (labels = folder names) or a flat folder (no labels).

    Links inside the folder are followed (`files.tree.walk`); msl-kit's own outputs (indexes,
    their pieces, faiss files, search CSVs and grids) are never inputs, so they do not make a
    tree of class folders look flat."""
    folder = folder.resolve()
    found = tree.walk(folder, skip=outputs.is_kit_output)
    files = found.files
    refused = [(str(p), why) for p, why in found.refused]
    if not files or any(p.parent == folder for p in files):  # flat: every file, no labels
        return _labelled([str(p) for p in files], None, str(folder), refused)
    names = [p.relative_to(folder).parts[0] for p in files]
    return _labelled([str(p) for p in files], names, str(folder), refused)


def csv_images(path: Path) -> ImageList:
    """A CSV of `path[,label]` rows (a header row is optional; paths relative to the CSV).

    Read as UTF-8 with or without a byte-order mark (spreadsheets' "CSV UTF-8" writes one);
    bytes that are not UTF-8 stay as they were in the file names (surrogate escapes)."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
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
    """A registered dataset's split (`datasets.build`), items named as its store names them."""
    ds = build(name, root, split, transform)
    paths = ds.item_names()  # files' real paths (searchable, shown), or "<name>:<item>"
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
    """Items (tensor or None, index, why): a file that cannot be used becomes None and the
    reason, not an error (undecodable, a mode that does not convert, too large to resize)."""

    def __init__(self, items: ImageList, transform: transforms.ImageTransform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            if self.items.dataset is not None:
                return self.items.dataset[index][0], index, ""
            image = transforms.load_image(self.items.paths[index], *self.transform.load_hint)
            return self.transform(image), index, ""
        except (transforms.CorruptImageError, OSError) as err:
            why = str(err.__cause__ or "") or str(err) or type(err).__name__  # PIL's words
            return None, index, why.splitlines()[0][:300]


def collate_kept(batch: list) -> tuple[torch.Tensor | None, list[int], list[int], list[str]]:
    """Stack the decoded images; return their indices, and those of the files that failed
    with the reasons."""
    kept = [(x, i) for x, i, _ in batch if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    failed = [(i, why) for x, i, why in batch if x is None]
    return images, [i for _, i in kept], [i for i, _ in failed], [w for _, w in failed]


def chunk_batches(chunks: Sequence[range], batch_size: int) -> Iterator[list[int]]:
    """Batches of `batch_size` consecutive indices that never cross a chunk's end."""
    for chunk in chunks:
        for start in range(chunk.start, chunk.stop, batch_size):
            yield list(range(start, min(start + batch_size, chunk.stop)))


def _fingerprint(sha: str, items: ImageList, spec: dict, opts, chunk: int) -> str:
    how = dataclasses.asdict(dataclasses.replace(opts, workers=0))  # workers change no vector
    digest = hashlib.sha256(json.dumps([JOB_VERSION, sha, spec, how, chunk]).encode())
    for p in items.paths:
        digest.update(os.fsencode(p) + b"\0")  # any file name, UTF-8 or not
        if items.dataset is None:  # a file replaced at the same path is new input
            try:
                st = os.stat(p)
                digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:  # unreadable now: skipped (and counted) when embedded
                pass
    if items.labels is not None:
        classes = "\0".join(items.classes).encode("utf-8", "surrogateescape")
        digest.update(items.labels.astype("<i8").tobytes() + classes)
    for p, why in items.refused:
        digest.update(b"\1" + os.fsencode(p) + why.encode("utf-8", "surrogateescape"))
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
    model, cfg = load_model(path, device=device)  # None: the run's device where this has it
    dev = recipe.pick_device(cfg.device)
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
def _embed_chunk(job: Job, batch: tuple) -> np.ndarray:
    images = batch[0]
    if images is None:
        return np.zeros((0, 0), np.float32)
    images = images.to(job.device, non_blocking=True)
    if job.opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with evaluation.autocast(job.opts.amp, job.device):
        return job.model(images).float().cpu().numpy()


def _shard_name(job: Job, chunk: range) -> str:
    return f"chunk_{chunk.start // job.chunk:06d}.npz"


def _save_shard(path: Path, emb: list, kept: list, failed: list, why: list, dim: int) -> None:
    vectors = np.concatenate(emb) if emb else np.zeros((0, dim), np.float32)
    arrays = dict(embeddings=vectors, kept=np.array(kept, np.int64))
    arrays.update(failed=np.array(failed, np.int64), why=np.array(why, dtype=str))
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def run_chunks(job: Job, part: Path, progress: bool = True) -> None:
    """Embed every chunk that OUT.part/ lacks, one atomically written shard per chunk."""
    from tqdm.auto import tqdm

    n = len(job.items.paths)
    chunks = [range(s, min(s + job.chunk, n)) for s in range(0, n, job.chunk)]
    missing = [c for c in chunks if not (part / _shard_name(job, c)).is_file()]
    done = n - sum(len(c) for c in missing)
    loader = DataLoader(
        Tolerant(job.items, job.transform),
        batch_sampler=list(chunk_batches(missing, job.opts.batch_size)),
        num_workers=job.opts.workers,
        collate_fn=collate_kept,
        pin_memory=job.device.type == "cuda",
    )
    bar = tqdm(total=n, initial=done, desc="embed", unit="img", disable=not progress)
    emb, kept, failed, why, dim = [], [], [], [], 0
    todo = iter(missing)
    current = next(todo, None)
    try:
        for batch in loader:
            vectors = _embed_chunk(job, batch)
            _, k, f, w = batch
            if len(k):
                emb.append(vectors)
                dim = vectors.shape[1]
            kept, failed, why = kept + k, failed + f, why + w
            bar.update(len(k) + len(f))
            if len(kept) + len(failed) == len(current):  # the chunk is complete: keep it
                _save_shard(part / _shard_name(job, current), emb, kept, failed, why, dim)
                emb, kept, failed, why = [], [], [], []
                current = next(todo, None)
    finally:
        bar.close()


def _read_pieces(job: Job, part: Path) -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    """The shards of every chunk, in order, with the kept and failed inputs and why; refuse
    pieces that do not cover every input exactly once (an index holds every input or none)."""
    n = len(job.items.paths)
    shards = [part / _shard_name(job, range(s, n)) for s in range(0, n, job.chunk)]
    kept, failed, why = [], [], []
    for shard in shards:
        if not shard.is_file():
            raise EmbedError(f"{shard} is missing: rerun the same command to embed it")
        with np.load(shard, allow_pickle=False) as z:
            kept.append(z["kept"])
            failed.append(z["failed"])
            why += z["why"].tolist()
    kept_all, failed_all = np.concatenate(kept), np.concatenate(failed)
    if not np.array_equal(np.sort(np.concatenate([kept_all, failed_all])), np.arange(n)):
        raise EmbedError(f"the pieces in {part} do not cover the {n} inputs: delete it and rerun")
    return shards, kept_all, failed_all, why


def assemble(job: Job, part: Path, out: Path) -> None:
    """OUT.npz from the shards in order: vectors streamed through a .npy on disk."""
    shards, kept_all, failed_all, why = _read_pieces(job, part)
    if not len(kept_all):
        raise EmbedError(
            f"none of the {len(failed_all)} file(s) in {job.items.where} is a readable image"
        )
    dim = 0
    for s in shards:
        with np.load(s) as z:
            dim = max(dim, z["embeddings"].shape[1] if len(z["kept"]) else 0)
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
    refused = [p for p, _ in items.refused]
    ckpt = job.checkpoint.resolve()
    members = [("embeddings", vectors), ("paths", np.array(items.paths)[kept_all])]
    if items.labels is not None:
        members += [("labels", items.labels[kept_all]), ("classes", np.array(items.classes))]
    members += [
        ("skipped", np.array([items.paths[i] for i in failed_all] + refused, dtype=str)),
        ("skipped_reasons", np.array(why + [w for _, w in items.refused], dtype=str)),
        ("inputs", np.array(len(items.paths) + len(refused), np.int64)),
        ("checkpoint", np.array(str(ckpt))),
        ("checkpoint_relative", np.array(os.path.relpath(ckpt, out.resolve().parent))),
        ("checkpoint_sha256", np.array(job.sha)),
        ("preprocessing", np.array(json.dumps(job.spec, sort_keys=True))),
        ("inputs_sha256", np.array(job.fingerprint)),
        ("embeddings_sha256", np.array(digest)),
        ("format", np.array(FORMAT)),
    ]
    atomic_write_bytes(out, lambda f: write_npz(f, members))


def holds_every_input(done: Embeddings, job: Job) -> bool:
    """Whether an existing index is this job's, complete: the same fingerprint, and its paths
    plus skipped entries are exactly the inputs listed now (a truncated file never passes)."""
    if done.inputs_sha256 != job.fingerprint:
        return False
    listed = job.items.paths + [p for p, _ in job.items.refused]
    if done.inputs != len(listed) or len(done) + len(done.skipped) != len(listed):
        return False
    held = np.concatenate([done.paths, np.array(done.skipped, dtype=str)])
    return bool(np.array_equal(np.sort(held), np.sort(np.array(listed, dtype=str))))


def _existing(out: Path) -> Embeddings | None:
    """The index at `out`, or None where there is none or it is damaged (then it is redone)."""
    if not out.exists():
        return None
    try:
        return Embeddings.load(out)
    except IndexFileError:
        return None


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
    A second `embed` into the same `out` while this one runs is refused (EmbedError).
    """
    check_options(batch_size, workers, chunk_size)
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
    out = outputs.check_replaceable(out, "index")
    lock = take_lock(
        outputs.lock_path(out), f"{out} is being written by another msl-kit embed", EmbedError
    )
    try:
        job = prepare_job(checkpoint, images, **options)
        done = _existing(out)
        if done is not None and holds_every_input(done, job):
            return done  # already done: the same job wrote all of it
        part = out.with_name(out.name + ".part")
        _start_part(job, part)
        run_chunks(job, part, progress)
        assemble(job, part, out)
        shutil.rmtree(part)
        return Embeddings.load(out)
    finally:
        lock.unlink(missing_ok=True)
