"""DDP helpers: 2 CPU processes (gloo) must reproduce the single-process gradient exactly.

One spawn runs every multi-process check (workers cost seconds to start); each worker
saves what it saw and the tests below judge it in the parent.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from msl_kit.losses import MultiSimilarityLoss, multi_similarity_loss
from msl_kit.losses.memory import CrossBatchMemory, xbm_step_loss
from msl_kit.sampler import PKSampler
from msl_kit.train.distributed import (
    DistInfo,
    all_gather_with_grad,
    global_batch_loss,
    init_distributed,
    is_distributed,
    wrap_ddp,
)

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 180
NUM_CLASSES, PER_CLASS, IN_DIM = 8, 5, 10
BATCH, K, STEPS = 16, 4, 3  # 4 classes per global batch, 2 per rank


class TinyEmbedder(nn.Module):
    """Linear + L2 normalisation: enough to couple every sample through the MS loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_DIM, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=1)


def _data() -> tuple[torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    centres = torch.randn(NUM_CLASSES, IN_DIM, generator=gen, dtype=torch.float64)
    x = centres[labels] + 1.5 * torch.randn(len(labels), IN_DIM, generator=gen, dtype=torch.float64)
    return x, labels


def _train_steps(info: DistInfo, use_memory: bool) -> dict:
    """STEPS of SGD on DDP and on a single-process copy fed the concatenated batch."""
    x, labels_np = _data()
    labels = torch.as_tensor(labels_np)
    torch.manual_seed(0)
    model = TinyEmbedder().double()
    reference = copy.deepcopy(model)
    ddp = wrap_ddp(model, info)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    loss_fn = MultiSimilarityLoss()
    memory, ref_memory = CrossBatchMemory(size=24), CrossBatchMemory(size=24)

    def step_loss(mem, it):
        def fn(emb, lab, idx):
            batch = loss_fn(emb, lab)
            return (
                xbm_step_loss(mem, it, batch, multi_similarity_loss, emb, lab, idx)
                if use_memory
                else batch
            )

        return fn

    ranked = PKSampler(
        labels_np, BATCH, K, seed=3, iterations=STEPS, num_replicas=WORLD_SIZE, rank=info.rank
    )
    single = PKSampler(labels_np, BATCH, K, seed=3, iterations=STEPS)
    out: dict = {
        "rank_batches": [],
        "single_batches": [],
        "grads": [],
        "ref_grads": [],
        "values": [],
        "ref_values": [],
    }
    for it, (mine, whole) in enumerate(zip(ranked, single)):
        out["rank_batches"].append(list(mine))
        out["single_batches"].append(list(whole))
        opt.zero_grad()
        ref_opt.zero_grad()
        idx = torch.as_tensor(mine)
        result = global_batch_loss(step_loss(memory, it), ddp(x[idx]), labels[idx], idx)
        result.scaled.backward()
        whole_idx = torch.as_tensor(whole)
        ref_loss = step_loss(ref_memory, it)(reference(x[whole_idx]), labels[whole_idx], whole_idx)
        ref_loss.backward()
        out["grads"].append([p.grad.detach().clone() for p in model.parameters()])
        out["ref_grads"].append([p.grad.detach().clone() for p in reference.parameters()])
        out["values"].append(result.value.item())
        out["ref_values"].append(ref_loss.item())
        opt.step()
        ref_opt.step()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["ref_params"] = [p.detach().clone() for p in reference.parameters()]
    out["memory_len"] = len(memory)
    return out


def _gather_checks(rank: int) -> dict:
    out: dict = {}
    # Uneven rows (2 on rank 0, 3 on rank 1) and a gradient that must stay local.
    rows = 2 + rank
    x = (torch.arange(rows * 3, dtype=torch.float64).view(rows, 3) + 100 * rank).requires_grad_(
        True
    )
    gathered = all_gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).view(gathered.shape) + 1
    (gathered * weights).sum().backward()
    out["gathered"] = gathered.detach()
    out["weights"] = weights
    out["x_grad"] = x.grad
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo", timeout=timedelta(seconds=60))
    try:
        results = {
            "info": (info.rank, info.world_size, info.local_rank, info.device.type),
            "is_distributed": is_distributed(),
            "ddp_type": type(wrap_ddp(TinyEmbedder(), info)).__name__,
            "plain": _train_steps(info, use_memory=False),
            "xbm": _train_steps(info, use_memory=True),
            **_gather_checks(rank),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned workers
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp_env.delenv(var, raising=False)
        ctx = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"DDP workers still running after {SPAWN_TIMEOUT_S} s (hung collective?)"
                    )
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
@pytest.mark.parametrize("variant", ["plain", "xbm"])
@pytest.mark.slow
def test_ddp_gradient_equals_single_process_gradient(ranks, variant):
    for rank, res in enumerate(ranks):
        run = res[variant]
        for step, (grads, ref_grads) in enumerate(zip(run["grads"], run["ref_grads"])):
            for g, ref in zip(grads, ref_grads):
                assert ref.abs().max() > 1e-4, "the reference gradient must not vanish"
                torch.testing.assert_close(
                    g, ref, rtol=1e-10, atol=1e-13, msg=lambda m: f"rank {rank} step {step}: {m}"
                )
        assert all(v > 0 for v in run["ref_values"])
        np.testing.assert_allclose(run["values"], run["ref_values"], rtol=1e-12)
        for p, ref in zip(run["params"], run["ref_params"]):
            torch.testing.assert_close(p, ref, rtol=1e-10, atol=1e-13)
    if variant == "xbm":
        assert ranks[0]["xbm"]["memory_len"] == 24  # each rank's memory took the global batch


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
@pytest.mark.slow
def test_process_group_info(ranks):
    assert [r["info"] for r in ranks] == [(0, 2, 0, "cpu"), (1, 2, 1, "cpu")]
    assert [r["is_distributed"] for r in ranks] == [True, True]
    assert {r["ddp_type"] for r in ranks} == {"DistributedDataParallel"}


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
@pytest.mark.slow
def test_sampler_splits_the_global_batch(ranks):
    batches = [r["plain"]["rank_batches"] for r in ranks]
    single = ranks[0]["plain"]["single_batches"]
    assert single == ranks[1]["plain"]["single_batches"]
    for step, whole in enumerate(single):
        first, second = batches[0][step], batches[1][step]
        assert len(first) == len(second) == BATCH // WORLD_SIZE
        assert not set(first) & set(second)
        assert first + second == whole


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
@pytest.mark.slow
def test_all_gather_with_grad_keeps_only_the_local_graph(ranks):
    expected = torch.cat(
        [
            torch.arange((2 + r) * 3, dtype=torch.float64).view(2 + r, 3) + 100 * r
            for r in range(WORLD_SIZE)
        ]
    )
    starts = [0, 2]
    for rank, res in enumerate(ranks):
        assert torch.equal(res["gathered"], expected)
        local = res["weights"][starts[rank] : starts[rank] + 2 + rank]
        # A gather that sent gradients back (e.g. torch.distributed.nn.all_gather) would sum
        # both ranks' identical weights here and give twice this.
        assert torch.equal(res["x_grad"], local)


def test_single_process_fallbacks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not is_distributed()
    model = TinyEmbedder()
    assert wrap_ddp(model, info) is model
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x
    emb = F.normalize(torch.randn(8, 5), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    result = global_batch_loss(MultiSimilarityLoss(), emb, labels)
    torch.testing.assert_close(result.scaled, MultiSimilarityLoss()(emb, labels))
    torch.testing.assert_close(result.value, result.scaled.detach())
