"""What recording the mining statistics costs a training step (issue 14: < 5 %).

    python bench/mining_overhead.py [--threads 2] [--steps 30]

Times one step of the embedded default (convnet, 28 px, batch 80 = 16 x 5) and one
`losses.mining_stats` call on that step's embeddings, interleaved; the engine calls it once
every `train.log_every` iterations (10 by default), so the cost per step is the ratio / 10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from msl_kit import losses
from msl_kit.train import recipe
from msl_kit.train.config import load_config


def main() -> None:
    """Print the median step time, the median statistics time and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config()
    recipe.seed_everything(0)
    model, loss_fn = recipe.build_model(cfg), recipe.build_loss(cfg)
    optimizer = recipe.build_optimizer(model, cfg)
    data = recipe.train_data(cfg)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=80, shuffle=True)))
    images, labels = batch[0], torch.arange(16).repeat_interleave(5)
    params = losses.MSParams.preset("released")
    steps, stats = [], []
    for i in range(args.steps + 3):
        start = time.perf_counter()
        emb = model(images)
        loss = loss_fn(emb, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        e = emb.detach()
        losses.mining_stats(e @ e.T, labels, params)
        end = time.perf_counter()
        if i >= 3:  # warm-up
            steps.append(middle - start)
            stats.append(end - middle)
    step, stat = statistics.median(steps), statistics.median(stats)
    print(f"threads {args.threads}, {args.steps} steps of the embedded default (batch 80)")
    print(f"training step      {1e3 * step:8.2f} ms")
    print(f"mining_stats call  {1e3 * stat:8.2f} ms  = {100 * stat / step:.1f} % of a step")
    every = cfg.train.log_every
    print(f"per step at log_every={every}: {100 * stat / step / every:.2f} %")


if __name__ == "__main__":
    main()
