"""torchrun / DDP helpers: process-group set-up, DDP wrapping, the MS loss on the global batch.

Launch with `torchrun --nproc_per_node=N ...`. In a plain single process every helper degrades
to a no-op, so the engine calls them unconditionally.

Why gather at all: the MS loss couples every pair of the batch (mining compares each anchor's
positives with its negatives), so N ranks each computing the loss on their own 1/N of the
batch is a different, weaker loss. Here every rank computes the loss on the global batch; the
only difference between ranks is which slice of it carries an autograd graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from msl_kit.errors import MslKitError


class DistributedError(MslKitError, RuntimeError):
    """A torchrun environment msl_kit cannot train in (no torch.distributed, too few GPUs)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: its global rank, the job size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


class GlobalBatchLoss(NamedTuple):
    """`scaled` is what to call backward() on; `value` is the plain global loss to log."""

    scaled: Tensor
    value: Tensor


def is_distributed() -> bool:
    """True when a process group is up with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """The number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(backend: str | None = None, *, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (or with WORLD_SIZE=1) nothing is initialised and the process runs
    alone on "cuda" when available, else the CPU. The backend defaults to nccl when CUDA is
    available, else gloo. Calling it again after the group is up only reports the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size <= 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    if not dist.is_available():
        raise DistributedError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError(
                "backend nccl needs CUDA; use backend='gloo' on CPU-only machines"
            )
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                f"lower torchrun's --nproc_per_node"
            )
        # Before init so NCCL's communicator and every later .cuda() land on this rank's GPU.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device
    )


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel on `info.device`; the model itself, untouched, in one process.

    find_unused_parameters stays False: every parameter of an embedding model gets a gradient
    each step, and the unused-parameter search costs a graph traversal per iteration.
    """
    if info.world_size <= 1 or not is_distributed():
        return model
    model = model.to(info.device)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=False
    )


def _comm_device(x: Tensor) -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones (and CUDA ones, via the host)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def _all_gather_padded(x: Tensor) -> list[Tensor]:
    """Every rank's `x` in rank order, allowing a different first dimension per rank.

    all_gather needs equal shapes, so the sizes travel first and each tensor is padded to
    the largest, then trimmed back.
    """
    device = _comm_device(x)
    x_comm = x.detach().to(device)
    size = torch.tensor([x_comm.shape[0]], device=device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if x_comm.shape[0] < longest:
        pad = x_comm.new_zeros((longest - x_comm.shape[0], *x_comm.shape[1:]))
        x_comm = torch.cat([x_comm, pad])
    slots = [torch.empty_like(x_comm) for _ in counts]
    dist.all_gather(slots, x_comm.contiguous())
    return [slot[:n].to(x.device) for slot, n in zip(slots, counts)]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` over ranks in rank order; only this rank's slice keeps its graph.

    Other ranks' slices are detached copies. No gradient needs to travel back between ranks
    because every rank evaluates the same global loss: rank r's backward yields the exact
    gradient for its own slice, and DDP's all-reduce adds the parameter gradients (see
    `global_batch_loss` for the scaling). Ranks may hold different numbers of rows.
    """
    if not is_distributed():
        return x
    parts = _all_gather_padded(x)
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def global_batch_loss(
    loss_fn: Callable[..., Tensor],
    embeddings: Tensor,
    labels: Tensor,
    indices: Tensor | None = None,
) -> GlobalBatchLoss:
    """Evaluate `loss_fn` on the global batch gathered from all ranks.

    Calls `loss_fn(global_embeddings, global_labels)`, or with `global_indices` as a third
    argument when `indices` is given (what the cross-batch memory needs). Returns
    `GlobalBatchLoss(scaled, value)`: backward on `scaled`; log `value` (detached, the same
    on every rank, equal to the single-process loss on the concatenated batch).
    """
    global_embeddings = all_gather_with_grad(embeddings)
    global_labels = all_gather_with_grad(labels)
    if indices is None:
        loss = loss_fn(global_embeddings, global_labels)
    else:
        loss = loss_fn(global_embeddings, global_labels, all_gather_with_grad(indices))
    world_size = get_world_size() if is_distributed() else 1
    # Rank r's backward gives g_r = dL/dtheta through its own slice only, and the full-batch
    # gradient is sum_r g_r. DDP all-reduces with a *mean*, (1/N) sum_r g_r, so each rank
    # multiplies by N beforehand; the result is the single-process gradient on the
    # concatenated batch, and the learning rate means the same at any world size.
    return GlobalBatchLoss(scaled=loss * world_size, value=loss.detach())
