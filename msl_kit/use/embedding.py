"""Embed your own images with a trained checkpoint: `embed(checkpoint, images, out)`.

The model and its eval transform come from the checkpoint exactly as `msl-kit evaluate` builds
them (stored config -> `recipe`), and batches are cut as `evaluation.extract` cuts them, so the
vectors are the ones evaluate scores. The inputs are listed into OUT.part/ (`listing`), vectors
stream there in chunks, each written atomically (`pieces`); a rerun after an interrupt embeds
only the missing chunks, and the final file is assembled from the chunks without holding them
all, with the same bytes as an uninterrupted run. No list of every path is held: memory beyond
the model is one chunk, one batch in flight and one folder's entries while it is listed.
OUT is locked while it is written (as a run folder is: `rundir.take_lock`), and an existing
OUT counts as up to date only when it holds every input of the same job.

Under torchrun (`torchrun --nproc_per_node N -m msl_kit.cli embed ...`, or across nodes with a
folder every node sees) rank 0 takes the lock, lists the inputs and says which chunks are left;
each rank embeds every N-th of them (`ranks`), and once all are written rank 0 assembles OUT:
the same bytes as one process, and a rerun after any rank died embeds only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from msl_kit.datasets import transforms
from msl_kit.datasets.dataset import build
from msl_kit.errors import MslKitError
from msl_kit.files.download import sha256sum
from msl_kit.train import evaluation, recipe
from msl_kit.train.checkpoint import load_model
from msl_kit.train.rundir import RunFolder, take_lock
from msl_kit.use import outputs
from msl_kit.use.columns import BLOCK, Texts, TextsError, encode, raw_blocks
from msl_kit.use.index import Embeddings, IndexFileError
from msl_kit.use.listing import EmbedError, ImageList, image_list, listed
from msl_kit.use.pieces import (
    assemble,
    chunk_ranges,
    held_job,
    open_part,
    piece_path,
    remove_part,
    save_piece,
    settle_part,
)
from msl_kit.use.ranks import Ranks

CHUNK_SIZE = 4096  # images per resumable piece: 8 MiB of 512-d vectors
JOB_VERSION = "embed 3"  # in the fingerprint: pieces and files of an older layout are redone


class EchoedError(EmbedError):
    """Rank 0's error, raised on the other ranks of a torchrun job too (rank 0 prints it)."""


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


class Tolerant(Dataset):
    """Items (tensor or None, index, why): a file that cannot be used becomes None and the
    reason, not an error (undecodable, a mode that does not convert, too large to resize)."""

    def __init__(self, items: ImageList, transform: transforms.ImageTransform) -> None:
        # only what a worker needs: a mapped column travels as its file names (`Texts`)
        self.paths, self.dataset, self.transform = items.paths, items.dataset, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            if self.dataset is not None:
                return self.dataset[index][0], index, ""
            image = transforms.load_image(self.paths[index], *self.transform.load_hint)
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


class ChunkBatches:
    """Batches of `batch_size` consecutive indices that never cross a chunk's end, made as the
    loader asks for them (a list of every batch would hold every index)."""

    def __init__(self, chunks: Sequence[range], batch_size: int) -> None:
        self.chunks, self.batch_size = chunks, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.chunks:
            for start in range(chunk.start, chunk.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, chunk.stop)))

    def __len__(self) -> int:
        return sum(-(-len(c) // self.batch_size) for c in self.chunks)


def _fingerprint(sha: str, items: ImageList, spec: dict, opts, chunk: int) -> str:
    how = dataclasses.asdict(dataclasses.replace(opts, workers=0))  # workers change no vector
    digest = hashlib.sha256(json.dumps([JOB_VERSION, sha, spec, how, chunk]).encode())
    for _, block in items.paths.raw_blocks():
        for raw in block:
            digest.update(raw + b"\0")  # any file name, UTF-8 or not
            if items.dataset is None:  # a file replaced at the same path is new input
                try:
                    st = os.stat(raw)
                    digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
                except OSError:  # unreadable now: skipped (and counted) when embedded
                    pass
    if items.labels is not None:
        for start in range(0, len(items.labels), BLOCK):
            digest.update(np.asarray(items.labels[start : start + BLOCK], "<i8").tobytes())
        digest.update("\0".join(items.classes).encode("utf-8", "surrogateescape"))
    for p, why in items.refused:
        digest.update(b"\1" + encode(p) + why.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclass
class Job:
    """One embedding job: the model, how it reads images, what to embed and where to."""

    model: torch.nn.Module
    device: torch.device
    opts: evaluation.EvalOptions
    transform: transforms.ImageTransform
    checkpoint: Path
    sha: str
    spec: dict
    chunk: int
    items: ImageList | None = None
    fingerprint: str = ""

    def about(self, out: Path) -> list[tuple[str, np.ndarray]]:
        """The members that describe the job in OUT (after its columns)."""
        ckpt = self.checkpoint.resolve()
        return [
            ("checkpoint", np.array(str(ckpt))),
            ("checkpoint_relative", np.array(os.path.relpath(ckpt, out.resolve().parent))),
            ("checkpoint_sha256", np.array(self.sha)),
            ("preprocessing", np.array(json.dumps(self.spec, sort_keys=True))),
            ("inputs_sha256", np.array(self.fingerprint)),
        ]


def load_job(
    checkpoint: str | Path,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    ranks: Ranks | None = None,
) -> Job:
    """Load the checkpoint's model and eval transform as `evaluate` does (on this rank's GPU
    under torchrun); nothing listed yet."""
    path = checkpoint_file(checkpoint)
    model, cfg = load_model(path, device=device)  # None: the run's device where this has it
    dev = (ranks or Ranks()).device(recipe.pick_device(cfg.device))
    model.to(dev)
    spec = recipe.preprocessing(cfg)
    opts = recipe.eval_options(cfg)
    opts = dataclasses.replace(
        opts,
        batch_size=batch_size or opts.batch_size,
        workers=opts.workers if workers is None else workers,
    )
    # whole batches per chunk: batches then fall where evaluate's fall (same vectors)
    chunk = max(1, -(-chunk_size // opts.batch_size)) * opts.batch_size
    tf = transforms.build_transform(spec, train=False)
    spec_d = dataclasses.asdict(spec)
    return Job(model.eval(), dev, opts, tf, path, sha256sum(path), spec_d, chunk)


def list_inputs(job: Job, images: str | Path | None, into: Path, **where) -> Job:
    """The job with its inputs listed into `into` and its fingerprint (what up to date means)."""
    items = image_list(images, transform=job.transform, into=into, **where)
    if not len(items.paths):
        raise EmbedError(f"no files to embed in {items.where or images}")
    fp = _fingerprint(job.sha, items, job.spec, job.opts, job.chunk)
    return dataclasses.replace(job, items=items, fingerprint=fp)


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


def run_chunks(
    job: Job, part: Path, todo: list[int], progress: bool = True, alone: bool = True
) -> None:
    """Embed the chunks numbered `todo`, one atomically written piece each in OUT.part/; the
    bar counts every input when this process works `alone`, else its own share."""
    from tqdm.auto import tqdm

    n = len(job.items.paths)
    chunks = chunk_ranges(n, job.chunk)
    mine = [chunks[i] for i in todo]
    loader = DataLoader(
        Tolerant(job.items, job.transform),
        batch_sampler=ChunkBatches(mine, job.opts.batch_size),
        num_workers=job.opts.workers,
        collate_fn=collate_kept,
        pin_memory=job.device.type == "cuda",
    )
    left = sum(len(c) for c in mine)
    total, desc = (n, "embed") if alone else (left, "embed (this rank's share)")
    bar = tqdm(total=total, initial=total - left, desc=desc, unit="img", disable=not progress)
    emb, kept, failed, why, dim = [], [], [], [], 0
    numbers = iter(todo)
    current = next(numbers, None)
    try:
        for batch in loader:
            vectors = _embed_chunk(job, batch)
            _, k, f, w = batch
            if len(k):
                emb.append(vectors)
                dim = vectors.shape[1]
            kept, failed, why = kept + k, failed + f, why + w
            bar.update(len(k) + len(f))
            if len(kept) + len(failed) == len(chunks[current]):  # complete: keep it
                save_piece(piece_path(part, current), emb, kept, failed, why, dim)
                emb, kept, failed, why = [], [], [], []
                current = next(numbers, None)
    finally:
        bar.close()


def holds_every_input(done: Embeddings, job: Job) -> bool:
    """Whether an existing index is this job's, complete: the same fingerprint, and its paths
    plus skipped entries are exactly the inputs listed now, in their order (a truncated file
    never passes); compared a block of paths at a time."""
    items = job.items
    if done.inputs_sha256 != job.fingerprint:
        return False
    listed_now = len(items.paths) + len(items.refused)
    if done.inputs != listed_now or len(done) + len(done.skipped) != listed_now:
        return False
    failed = len(done.skipped) - len(items.refused)
    if failed < 0 or list(done.skipped[failed:]) != [p for p, _ in items.refused]:
        return False
    try:
        return _interleaves(items.paths, done.paths, [encode(p) for p in done.skipped[:failed]])
    except TextsError:  # its paths blob is damaged: redone
        return False


def _interleaves(listing: Texts, kept: Sequence[str], failed: list[bytes]) -> bool:
    """Whether `listing` is `kept` in order with the `failed` ones slotted in, in order."""
    held = (raw for _, block in raw_blocks(kept) for raw in block)
    f = 0
    for _, block in listing.raw_blocks():
        if f == len(failed):  # the rest are all kept: compared a block at once
            if list(itertools.islice(held, len(block))) != block:
                return False
            continue
        for raw in block:
            if f < len(failed) and raw == failed[f]:
                f += 1
            elif next(held, None) != raw:
                return False
    return f == len(failed) and next(held, None) is None


def _existing(out: Path) -> Embeddings | None:
    """The index at `out`, or None where there is none or it is damaged (then it is redone)."""
    if not out.exists():
        return None
    try:
        return Embeddings.load(out)
    except (IndexFileError, TextsError):
        return None


def _plan(checkpoint, images, out: Path, part: Path, load: dict, where: dict, progress: bool):
    """Rank 0's part: the job listed into OUT.part/, and what is left to do: nothing when OUT
    already holds it, else the chunks that have no piece yet."""
    job = load_job(checkpoint, **load)  # (rank 0's GPU is cuda:0 under torchrun too)
    created = not part.exists()
    open_part(part)
    try:
        job = list_inputs(job, images, part, **where)
    except BaseException:
        if created:  # nothing of value in it: a mistyped folder leaves nothing behind
            remove_part(part)
        raise
    done = _existing(out)
    if done is not None and holds_every_input(done, job):
        remove_part(part)
        return job, {"done": True}
    settle_part(part, job.fingerprint, progress)
    count = len(chunk_ranges(len(job.items.paths), job.chunk))
    missing = [i for i in range(count) if not piece_path(part, i).is_file()]
    if progress and len(missing) < count:
        print(
            f"{part} holds {count - len(missing)} of the {count} pieces of this job: "
            f"embedding the other {len(missing)}",
            file=sys.stderr,
        )
    return job, {"done": False, "missing": missing, "fingerprint": job.fingerprint}


def _follow(checkpoint, part: Path, plan: dict, load: dict, where: dict, ranks: Ranks) -> Job:
    """A rank other than 0: the same model, and the inputs as rank 0 listed them."""
    if held_job(part) != plan["fingerprint"]:  # another node's folder at that path, or none
        raise EmbedError(
            f"rank {ranks.rank} does not see the {part} that rank 0 wrote: under torchrun "
            "across machines, --out must be in a folder every machine sees (a shared disk)"
        )
    job = load_job(checkpoint, ranks=ranks, **load)
    ds = None
    if where["dataset"] is not None:
        ds = build(where["dataset"], where["root"], where["split"], job.transform)
    items = ImageList(listed(part), None, [], ds)
    return dataclasses.replace(job, items=items, fingerprint=plan["fingerprint"])


def _embed_into(checkpoint, images, out: Path, ranks: Ranks, load: dict, where: dict, progress):
    """Write OUT (every rank calls this; rank 0 locks, lists, assembles)."""
    part = out.with_name(out.name + ".part")
    lock = None
    busy = f"{out} is being written by another msl-kit embed"
    try:
        if ranks.main:
            try:
                lock = take_lock(outputs.lock_path(out), busy, EmbedError)
                job, plan = _plan(checkpoint, images, out, part, load, where, progress)
            except (MslKitError, OSError) as e:
                ranks.share({"error": " ".join(str(e).split())})  # the others stop too
                raise
            ranks.share(plan)
        else:
            plan = ranks.share(None)
            if "error" in plan:
                raise EchoedError(plan["error"])
            job = None if plan["done"] else _follow(checkpoint, part, plan, load, where, ranks)
        if plan["done"]:
            return
        mine = ranks.mine(plan["missing"])
        run_chunks(job, part, mine, progress and ranks.main, alone=ranks.world == 1)
        ranks.wait()  # every rank's pieces are written
        if ranks.main:
            assemble(job.items, part, out, job.chunk, job.about(out))
            remove_part(part)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


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
) -> Embeddings | None:
    """Embeddings of a folder, CSV or image, or of a prepared split (`dataset=`, `split=`),
    by a checkpoint's model (a checkpoint file or a run folder), written to `out` (FILE.npz)
    when given. Rerunning after an interrupt embeds only what OUT.part/ lacks; an up-to-date
    `out` is read, not redone. batch_size / workers / device default to the run's own.
    A second `embed` into the same `out` while this one runs is refused (EmbedError).

    Under torchrun (WORLD_SIZE > 1) every rank calls it alike with an `out` in a folder they
    all see: each embeds its share of the chunks, rank 0 writes `out` and returns it, the
    other ranks return None once their share is written. The file read back maps its vectors
    and paths (`Embeddings.load`); without `out` they are read into memory.
    """
    check_options(batch_size, workers, chunk_size)
    load = dict(batch_size=batch_size, workers=workers, device=device, chunk_size=chunk_size)
    where = dict(dataset=dataset, root=root, split=split)
    if out is None:  # a job of its own in this process, even inside a torchrun job
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "e.npz"
            _embed_into(checkpoint, images, path, Ranks(), load, where, progress)
            return Embeddings.load(path, lazy=False)
    out = outputs.check_replaceable(out, "index")
    ranks = Ranks.join()
    try:
        _embed_into(checkpoint, images, out, ranks, load, where, progress)
    finally:
        ranks.leave()
    return Embeddings.load(out) if ranks.main else None
