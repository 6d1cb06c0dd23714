"""`embed` across processes: where this process sits in a torchrun job, and the two things
the ranks say to each other (rank 0's plan, then "my pieces are written").

Launched as `torchrun --nproc_per_node N -m msl_kit.cli embed ...` (or across nodes, as
training runs), every process joins a gloo group: the messages are a few bytes of JSON, so
gloo serves CPUs and GPUs alike and nothing is pickled. One process alone needs no group and
every call here is then a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from msl_kit.errors import MslKitError
from msl_kit.train.distributed import DistributedError, init_distributed

# Rank 0 lists the inputs (a stat per file) before the others hear its plan, and assembles
# the file after they are done: a slow disk must not trip gloo's default 30-minute timeout.
# A rank that dies is noticed by torchrun, which stops the others.
WAIT = timedelta(hours=12)


class RankLostError(MslKitError, RuntimeError):
    """Another process of the torchrun job stopped while this one waited for it."""


def _lost(err: RuntimeError) -> RankLostError:
    # gloo's words ("Connection closed by peer ...") name no rank and no remedy
    return RankLostError(
        "another process of this torchrun job stopped (its own error says why); the pieces "
        "written so far are kept: rerun the same command to embed only what is missing"
    )


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the number of processes, and its rank on its own node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # joined the gloo group itself: leaves it when done

    @property
    def main(self) -> bool:
        """Whether this process lists, assembles and reports (rank 0)."""
        return self.rank == 0

    @classmethod
    def join(cls) -> Ranks:
        """The job torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK ...), its gloo group joined
        unless one is up already; one process alone without torchrun."""
        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return cls(dist.get_rank(), dist.get_world_size(), local)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        info = init_distributed("gloo", timeout=WAIT)
        return cls(info.rank, info.world_size, info.local_rank, owns_group=True)

    def leave(self) -> None:
        """Leave the gloo group this process joined, error or not: a process that exits with
        it up can abort in gloo's threads (exit status -6 in place of its own)."""
        if self.owns_group and dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # a peer gone already: nothing to close
                dist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """This rank's own GPU where the model runs on CUDA (cuda:LOCAL_RANK), else `device`."""
        if self.world > 1 and device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK={self.local_rank} but only {torch.cuda.device_count()} GPUs "
                    "are visible; lower torchrun's --nproc_per_node (one process per GPU)"
                )
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, message: dict | None) -> dict:
        """Rank 0's `message` (JSON) on every rank; the others pass None."""
        if self.world == 1:
            return message or {}
        on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # a group the caller set up
        data = json.dumps(message).encode() if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=on)
        try:
            dist.broadcast(size, src=0)
            buffer = torch.zeros(int(size), dtype=torch.uint8, device=on)
            if self.main:
                buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            dist.broadcast(buffer, src=0)
        except RuntimeError as err:  # a peer gone: gloo raises a bare RuntimeError
            raise _lost(err) from None
        return json.loads(buffer.cpu().numpy().tobytes().decode())

    def wait(self) -> None:
        """Return once every rank has called this (every rank's pieces are written)."""
        if self.world > 1:
            try:
                dist.barrier()
            except RuntimeError as err:
                raise _lost(err) from None

    def mine(self, work: list[Any]) -> list[Any]:
        """This rank's share of `work`: every world-th item from its rank on."""
        return work[self.rank :: self.world]
