"""GPU check: dtlray's epoch loop against a plain PyTorch loop, ResNet-50 at 224 px, fp32 and bf16.

Synthetic data (random uint8 images, 10 classes) held on the device's host side the way a
dtlray worker holds its in-memory split. For each precision, in one run, side by side:

* **plain**: the textbook loop — autocast (bf16) or not, ``channels_last`` as dtlray's worker,
  SGD with Nesterov momentum, cross-entropy, one head.
* **dtlray**: :func:`dtlray.train_loop.train_one_epoch` on a real :class:`TransferModel` built
  from a :class:`TrialConfig` with ``resources.precision`` set — the function every dtlray
  trial's worker runs each epoch (resize to the model input, per-task batching, the loss).

Prints samples/s per side and ``RATIO dtlray/plain`` per precision (goal >= 0.9). Epoch 1 of
each side is warm-up (cuDNN autotuning) and excluded. Sized to finish in a few minutes on one
GPU; ``--tiny`` runs a ResNet-18 at 32 px on the CPU to check that the script works at all.

    .venv/bin/python bench/gpu_check.py            # on a GPU machine
    .venv/bin/python bench/gpu_check.py --tiny     # anywhere, a minute on a CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dtlray.config import TrialConfig
from dtlray.stages import DatasetMeta, build_model, finetune_stage
from dtlray.train_loop import build_optimizer, train_one_epoch
from dtlray.worker import InMemorySplit, WorkerEnv, resolve_precision


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="ResNet-18 at 32 px on the CPU")
    parser.add_argument("--rows", type=int, default=None, help="synthetic images per epoch")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3, help="per side; the first is warm-up")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is warm-up)")
    return args


def trial_config(args: argparse.Namespace, precision: str) -> TrialConfig:
    """The trial whose finetune epoch is measured (one target of 10 classes)."""
    size = 32 if args.tiny else 224
    return TrialConfig.from_flat(
        {
            "data.targets": ["synthetic"],
            "data.image_size": size,
            "data.channels": 3,
            "model.backbone": "resnet18" if args.tiny else "resnet50",
            "model.small_input": False,
            "model.fusion_depth": 1,
            "stage2.batch_size": args.batch_size or (32 if args.tiny else 128),
            "stage2.lr": 0.01,
            "resources.precision": precision,
        }
    )


def synthetic(rows: int, size: int, seed: int = 0) -> InMemorySplit:
    """Random uint8 images (N, 3, size, size) and labels, stored at the model's input size."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (rows,), generator=generator)
    return InMemorySplit(images.pin_memory() if torch.cuda.is_available() else images, labels)


def plain_epoch(model, optimizer, data: InMemorySplit, cfg: TrialConfig, env: WorkerEnv) -> float:
    """One epoch of the textbook loop; returns samples/s."""
    model.train()
    batch = cfg.stage2.batch_size
    order = torch.randperm(len(data))
    start = time.perf_counter()
    for i in range(0, len(data) - batch + 1, batch):
        idx = order[i : i + batch]
        x = data.images[idx].to(env.device, non_blocking=True).float().div_(255.0)
        x = x.contiguous(memory_format=env.memory_format)
        y = data.labels[idx].to(env.device, non_blocking=True)
        with torch.autocast(
            env.device.type, dtype=env.amp_dtype, enabled=env.amp_dtype is not None
        ):
            loss = F.cross_entropy(model(x)["synthetic"], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    steps = (len(data) - batch) // batch + 1
    return steps * batch / (time.perf_counter() - start)


def measure(args: argparse.Namespace, precision: str, device: torch.device) -> tuple[float, float]:
    """Median samples/s of (plain, dtlray) over the epochs after the first."""
    cfg = trial_config(args, precision)
    meta = {"synthetic": DatasetMeta("synthetic", 10, (cfg.data.image_size,) * 2 + (3,))}
    spec = finetune_stage(cfg, meta)
    rows = args.rows or (512 if args.tiny else 8192)
    data = {"synthetic": synthetic(rows, cfg.data.image_size)}
    env = WorkerEnv(
        rank=0,
        world_size=1,
        device=device,
        seed=0,
        image_size=cfg.data.image_size,
        channels=3,
        **resolve_precision(cfg.resources.precision, device, cfg.resources.channels_last),
    )
    rates: dict[str, list[float]] = {"plain": [], "dtlray": []}
    for side in ("plain", "dtlray"):
        torch.manual_seed(0)
        model = build_model(cfg, spec.heads).to(device, memory_format=env.memory_format)
        optimizer = build_optimizer(model, spec)
        for epoch in range(args.epochs):
            if side == "plain":
                rate = plain_epoch(model, optimizer, data["synthetic"], cfg, env)
            else:
                stats = train_one_epoch(model, model, spec, data, optimizer, epoch, env)
                rate = stats["train/samples_per_s"]
            if epoch > 0:
                rates[side].append(rate)
            print(f"  {precision} {side:<7} epoch {epoch + 1}: {rate:9.1f} samples/s", flush=True)
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return statistics.median(rates["plain"]), statistics.median(rates["dtlray"])


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each precision; print the table and the ratios."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({os.cpu_count()} cores)"
        torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | {name} | "
        f"{'resnet18 32px (tiny)' if args.tiny else 'resnet50 224px'}",
        flush=True,
    )
    results = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        results[precision] = measure(args, precision, device)
    print(f"\n{'precision':<10}{'plain':>12}{'dtlray':>12}{'ratio':>8}   (samples/s, median 2..)")
    for precision, (plain, dtlray) in results.items():
        print(f"{precision:<10}{plain:>12.1f}{dtlray:>12.1f}{dtlray / plain:>8.3f}")
    for precision, (plain, dtlray) in results.items():
        print(f"RATIO dtlray/plain {precision} = {dtlray / plain:.3f}  (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
