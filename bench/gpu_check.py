"""The GPU checks of issues 4, 20 and 26 in one script: loss fp32 vs bf16, BN-Inception train
images/s, kNN at SOP size, and one short step of each timm recipe (ViT-S/16 DINO on CUB, Cars,
SOP; ResNet-50 Proxy-Anchor on CUB; EfficientNet-Lite0 on cached activations, its own float32
and bf16) at its batch, size and autocast: images/s, peak memory.

python bench/gpu_check.py                      # on a CUDA machine; about 3-4 minutes on one H100
python bench/gpu_check.py --device cpu --quick # smoke run of the script itself (tests use this)
"""

from __future__ import annotations

import argparse
import time

import torch

from msl_kit import losses, metrics, models
from msl_kit.losses.registry import loss_spec
from msl_kit.train import recipe
from msl_kit.train.config import load_config
from msl_kit.train.prefix_cache.run import FrozenPrefix

TIMM_RECIPES = (
    "cub200_vits16_dino_384",
    "cars196_vits16_dino_384",
    "sop_vits16_dino_384",
    "cub200_resnet50_512",
    "cub200_lite0_cpu",  # a CPU recipe: its first GPU run (its tail step; also under bf16)
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_agreement(device: torch.device, batch: int, dim: int) -> None:
    """MS loss and gradient in float32 against bf16 autocast on the same unit embeddings."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(batch // 8).repeat_interleave(8).to(device)
    base = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device)
    loss_fn = losses.MultiSimilarityLoss()
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        emb = base.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            x = emb.to(dtype) if dtype is not None else emb
            loss = loss_fn(x, labels)
        loss.backward()
        results[name] = (loss.detach().double(), emb.grad.double().flatten())
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    rel_diff = abs(l16 - l32).item() / max(abs(l32.item()), 1e-12)
    print(
        f"loss {batch}x{dim}: fp32 {l32.item():.6f}  bf16 {l16.item():.6f}  rel diff "
        f"{rel_diff:.2e}  grad cosine {cos:.6f}  finite {bool(torch.isfinite(g16).all())}"
    )


def train_throughput(
    device: torch.device, batch: int, size: int, steps: int, amp: bool, warmup: int = 3
) -> float:
    """BN-Inception + MS loss + Adam, random images, frozen BN: images per second."""
    model = models.build_model("bninception", 512, freeze_bn=True).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3e-5, weight_decay=5e-4)
    loss_fn = losses.MultiSimilarityLoss()
    images = torch.randn(batch, 3, size, size, device=device) * 50
    if amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch // 5, device=device).repeat_interleave(5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            emb = model(images)
        loss = loss_fn(emb.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def knn_timing(device: torch.device, n: int, dim: int) -> None:
    """recall_at_k on n unit vectors with the query = gallery protocol, on the device."""
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    labels = torch.randint(0, max(n // 5, 1), (n,), generator=g).to(device)
    metrics.recall_at_k(emb[:1000], labels[:1000])  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    result = metrics.recall_at_k(emb, labels, ks=(1, 10, 100) if n > 100 else (1, 2))
    _sync(device)
    print(f"recall_at_k {n}x{dim} on {device}: {time.perf_counter() - start:.2f} s  {result}")


def recipe_step(
    device: torch.device, name: str, quick: bool, steps: int, extra: tuple[str, ...] = ()
) -> None:
    """One recipe's training step on fake images at its input size (or, for a recipe that
    caches a frozen prefix, on fake activations of the prefix's output), as the trainer builds
    it: model, loss, optimizer groups, autocast and clipping from the recipe, random weights
    (no download); prints images/s and peak memory."""
    overrides = ["model.pretrained=null", f"device={device}", "data.workers=0", *extra]
    if quick:  # a few images: checks the script, measures nothing
        overrides += ["train.batch_size=4", "train.samples_per_class=2"]
    cfg = load_config(name, overrides)
    t = cfg.train
    torch.manual_seed(0)
    model = recipe.build_model(cfg).to(device)
    batch, side = t.batch_size, model.preprocessing.input_size
    classes = 100  # CUB's training classes; the proxies' count for Proxy-Anchor
    needs = loss_spec(cfg.loss.name).needs_classes
    loss_fn = recipe.build_loss(cfg, classes if needs else None).to(device)
    if t.sampler == "random":
        labels = torch.randint(0, classes, (batch,), device=device)
    else:
        labels = torch.arange(batch // t.samples_per_class, device=device)
        labels = labels.repeat_interleave(t.samples_per_class)
    net, images, what = model, torch.randn(batch, 3, side, side, device=device), f"at {side} px"
    if cfg.cache.prefix and cfg.cache.views:  # the trainer steps on cached activations
        prefix = FrozenPrefix.attach(cfg, model, device)  # freezes it before the optimizer
        net, images = prefix.net(model), torch.randn(batch, *prefix.shape, device=device)
        shape = "x".join(map(str, prefix.shape))
        what = f"at {side} px, tail after {cfg.cache.prefix} on cached {shape} activations"
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    opt = recipe.build_optimizer(model, cfg, loss_fn)
    params = [p for group in opt.param_groups for p in group["params"]]
    amp = t.amp if device.type == "cuda" else "none"  # CPU smoke runs in float32
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=PRECISIONS[amp], enabled=amp != "none"):
            emb = net(images)
        loss = loss_fn(emb.float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if t.grad_clip_value:
            torch.nn.utils.clip_grad_value_(params, t.grad_clip_value)
        if t.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm)
        scaler.step(opt)
        scaler.update()

    if not quick:  # a quick run measures nothing: its one step is the whole check
        step()  # warm-up: kernels, allocator, optimizer state
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    speed = batch * steps / (time.perf_counter() - start)
    peak = (
        f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        if device.type == "cuda"
        else "not measured on the CPU"
    )
    print(
        f"recipe {name}: {cfg.model.backbone} batch {batch} {what}, {amp}: "
        f"{speed:.1f} images/s, peak memory {peak}"
    )


PRECISIONS = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    """Run the three checks and print their figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the script, measures nothing"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA device visible; use --device cpu --quick to check the script only"
            )
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    batch, size, steps, n = (5, 227, 1, 2000) if args.quick else (80, 227, 20, 60000)
    loss_agreement(device, 80 if args.quick else 1024, 512)
    for amp in (False, True):
        label = "AMP bf16 + channels_last" if amp else "fp32"
        speed = train_throughput(device, batch, size, steps, amp, warmup=0 if args.quick else 3)
        print(f"BN-Inception train batch {batch} at {size} px, {label}: {speed:.1f} images/s")
    knn_timing(device, n, 512)
    for name in TIMM_RECIPES:
        recipe_step(device, name, args.quick, steps=1 if args.quick else 3)
    # the CPU recipe under bf16 autocast, as a GPU run would set it (train.amp=bf16)
    recipe_step(device, "cub200_lite0_cpu", args.quick, 1 if args.quick else 3, ("train.amp=bf16",))


if __name__ == "__main__":
    main()
