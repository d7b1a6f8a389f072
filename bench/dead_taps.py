"""What skipping dead kernel taps (:class:`dtlray.models.conv.DeadTapConv2d`) saves per train step.

dtlray's backbones crop each zero-padded convolution's kernel to the taps that can reach the
input. On a 1x1 map a 3x3 convolution has only its centre tap live: that is ResNet's ``layer4``
at 32 px with the standard stem, as in ``search_spaces/quickstart.yaml``. This script builds the
same :class:`~dtlray.models.TransferModel` twice from the same weights: once as dtlray builds it,
once with every DeadTapConv2d put back to a plain ``nn.Conv2d`` (the full kernel, what torchvision
computes). It times a whole SGD step of each, forward, backward and update, on one batch of random
images of the quickstart's shape. The two are interleaved, one step of each in turn, so the
machine's drift hits both alike. It prints per case the median step time of each, their ratio,
and how far apart the two models' outputs are (float rounding only).

    .venv/bin/python bench/dead_taps.py                 # the quickstart's cases, ~2 min
    .venv/bin/python bench/dead_taps.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dtlray.models import TransferModel, build_transfer_model
from dtlray.models.conv import restore_full_kernels

# (backbone, small_input, image size): the quickstart's two backbones at its size and stem, and
# the small-input stem and 64 px for contrast (layer4 sees 4x4 and 2x2 maps there: nothing dead).
CASES = [
    ("resnet18", False, 32),
    ("vgg11_bn", False, 32),
    ("resnet18", True, 32),
    ("resnet18", False, 64),
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="the quickstart's stage 1")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a trial's)")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--steps, --batch-size and --threads must be at least 1")
    return args


def with_full_kernels(model: TransferModel) -> TransferModel:
    """A copy of ``model`` whose DeadTapConv2d modules are plain ``nn.Conv2d`` again."""
    plain = copy.deepcopy(model)
    assert restore_full_kernels(plain) > 0
    return plain


def make_step(
    model: TransferModel, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[], float]:
    """One SGD step (Nesterov momentum, as stage 1) on a fixed batch; returns its seconds."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    task = next(iter(model.heads))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images)[task], labels)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def run_case(
    backbone: str, small_input: bool, size: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """Median step seconds with dead taps skipped and with full kernels, and the output gap."""
    layout = torch.contiguous_format if args.nchw else torch.channels_last
    torch.manual_seed(0)
    model = build_transfer_model(
        backbone=backbone,
        in_channels=1,
        small_input=small_input,
        weights=None,
        fusion_depth=1,
        fusion_width=256,
        heads={"source": 10},
    )
    plain = with_full_kernels(model)
    model, plain = (m.to(memory_format=layout) for m in (model, plain))
    images = torch.randn(args.batch_size, 1, size, size).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (args.batch_size,))
    with torch.no_grad():
        gap = (model.eval()(images)["source"] - plain.eval()(images)["source"]).abs().max().item()
    model.train(), plain.train()
    steps = {"dtlray": make_step(model, images, labels), "full": make_step(plain, images, labels)}
    for step in steps.values():  # warm-up: oneDNN picks and caches its kernels
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step())
    return statistics.median(times["dtlray"]), statistics.median(times["full"]), gap


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = "NCHW" if args.nchw else "channels_last"
    print(
        f"{os.cpu_count()} CPUs | load average {os.getloadavg()[0]:.2f} | torch "
        f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()}) | {args.threads} "
        f"thread(s) | batch {args.batch_size} | {layout} | median of {args.steps} interleaved steps"
    )
    print(
        f"{'case':34} {'full kernels':>13} {'dead taps skipped':>18} {'ratio':>6} "
        f"{'max |diff|':>11}"
    )
    for backbone, small_input, size in CASES:
        ours, full, gap = run_case(backbone, small_input, size, args)
        case = f"{backbone} {'small' if small_input else 'standard'} stem {size}px"
        print(
            f"{case:34} {full * 1000:10.0f} ms {ours * 1000:15.0f} ms {full / ours:5.2f}x "
            f"{gap:11.1e}"
        )
    print(f"(ratio = full / skipped; load average at the end {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
