"""Does Ray Data deliver images as fast as the model consumes them? Raw and JPEG, 32 and 224 px.

Measures, side by side in one run on this machine:

* **decode on one core**: :func:`dtlray.data.codec.decode_images` in this process, images/s
  (JPEG 224 -> 224, 224 -> 32; raw 224 -> 32 for comparison).
* **model consumption**: samples/s of a train pass of the default model (``resnet18``, no
  pretrained weights, ``ModelConfig``'s default fusion depth, ``small_input`` as ``auto`` picks
  it) at the delivered size: ``to_model_input`` + forward + cross-entropy + backward + SGD step on
  batches of ``--batch-size``, a few warm-up steps then timed ones. Runs before Ray starts and
  again after it stops; the rate is the median step over both (a gap between the two runs means
  the machine's load changed).
* **ingest**: images/s that reach a consuming loop which iterates a Ray Data stream
  (``read_parquet(files).map_batches(DecodeBatch(...), batch_format="pyarrow")``) with
  ``iter_batches`` and turns each batch into tensors with ``decode_uint8`` (the worker's first
  step). Ray Data runs on a private local Ray of ``--cpus`` CPUs; the consuming loop runs in this
  process beside it. The rate counts from the pass's first decode in Ray Data (stamped by the
  decoding task) to the last batch in the loop: the throughput an epoch of a real-sized dataset
  sees. The start-up before it (executor start, first file read) is printed on its own. One
  warm-up pass, then passes until ``--seconds`` have passed (at least two); the median.

Ray Data (2.60) reads one Parquet file in one task, whatever its row groups, and the decode runs
fused into that task: the decode runs on at most as many CPUs as there are files. The bench writes
``--shards`` files per dataset (default: 64 images each, at least 4 per CPU).

The images are real photographs: random square crops (side 224 px up to the photo's shorter
side, resized to 224 with PIL's antialiased bilinear) of the photographs bundled with
scikit-learn and scikit-image, and the same crops resized to 32 px. Nothing is downloaded. They
are written as Parquet shards by :func:`write_shards` with the codec prepare uses.

The ratio is ingest / consumption at the same delivered size (above 1: the model, not the input,
sets the pace). ``per CPU`` divides ingest by the CPUs Ray Data had: how many such trainers one
decoding core keeps fed. The last line, ``INGEST RATIO = X``, is JPEG stored and delivered at
224 px with the default model. Stored bytes per image (raw vs JPEG at 224 px; goal JPEG <= 1/5
of raw) are printed as the encoded rows and as Parquet file bytes (compressed as prepare does).

Run from the repository root (about 2-3 minutes on 2 idle cores)::

    .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --quick            # smoke run, about a minute
    .venv/bin/python bench/ingest.py --images 1000 --cpus 1
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import ray
import ray.data
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images

from dtlray.config import ModelConfig
from dtlray.data.codec import JPEG_QUALITY, DecodeBatch, decode_images
from dtlray.data.decode import decode_uint8, to_model_input
from dtlray.data.prepare import images_to_table, parquet_compression
from dtlray.models import build_transfer_model, default_small_input
from dtlray.ray_session import init_ray

NUM_CLASSES = 10
LARGE, SMALL = 224, 32
SIZES = (SMALL, LARGE)


# -- configuration ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images per dataset")
    parser.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the private Ray (ingest)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of the train pass (consumption)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default=ModelConfig().backbone)
    parser.add_argument("--device", default="cpu", help="device of the train pass (cpu, cuda, ...)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed train steps per size")
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="minimum timed ingest per configuration"
    )
    parser.add_argument("--shards", type=int, default=None, help="Parquet files per dataset")
    parser.add_argument("--quick", action="store_true", help="smoke run: few images and steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 256)
        args.seconds = min(args.seconds, 1.0)
        args.steps = args.steps or 2
        args.warmup_steps = min(args.warmup_steps, 1)
    args.steps = args.steps or 6
    # one read + decode task per file: enough of them for every CPU, and small ones
    args.shards = args.shards or max(4 * args.cpus, math.ceil(args.images / 64))
    if min(args.images, args.cpus, args.threads, args.batch_size, args.steps, args.shards) < 1:
        parser.error("--images, --cpus, --threads, --batch-size, --steps, --shards must be >= 1")
    return args


# -- the images ---------------------------------------------------------------------------------


def bundled_photos() -> list[np.ndarray]:
    """RGB photographs shipped with scikit-learn and scikit-image (no download)."""
    photos = list(load_sample_images().images)  # china, flower: 427x640
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        photos.append(getattr(skimage.data, name)())
    photos.append(skimage.data.immunohistochemistry())
    photos.append(skimage.data.stereo_motorcycle()[0])
    return [np.ascontiguousarray(p[..., :3], dtype=np.uint8) for p in photos]


def photo_crops(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``(count, size, size, 3)`` random square crops of :func:`bundled_photos`, resized."""
    photos = bundled_photos()
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        side = int(rng.integers(size, min(height, width) + 1))
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
    return out


def shrink(images: np.ndarray, size: int) -> np.ndarray:
    """The same images at ``size`` px (PIL's antialiased bilinear, as the codec resizes)."""
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
            for image in images
        ]
    )


@dataclass
class Shards:
    """A dataset written for the bench: its files and what it stores."""

    files: list[str]
    rows: int
    image_format: str
    image_shape: tuple[int, int, int]
    encoded_bytes: int  # the image column's rows
    file_bytes: int  # the Parquet files on disk


def write_shards(
    images: np.ndarray, labels: np.ndarray, image_format: str, directory: Path, shards: int
) -> Shards:
    """Write ``images`` as ``shards`` Parquet files of ``image`` + ``label``, as prepare does.

    The one place the bench makes its data: switching it to ``dtlray data prepare --image-folder
    ... --image-format FORMAT`` means replacing this function (the shards' files, format and
    shape then come from the dataset's ``dataset.json``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    files, encoded_bytes = [], 0
    for number, rows in enumerate(np.array_split(np.arange(len(images)), shards)):
        table = images_to_table(images[rows], labels[rows], image_format)
        column = table.column("image")
        encoded_bytes += column.nbytes - 4 * (len(column) + 1)  # rows only, not offsets
        path = directory / f"part-{number:05d}.parquet"
        pq.write_table(table, path, compression=parquet_compression(image_format))
        files.append(str(path))
    return Shards(
        files=files,
        rows=len(images),
        image_format=image_format,
        image_shape=tuple(images.shape[1:]),  # type: ignore[arg-type]
        encoded_bytes=encoded_bytes,
        file_bytes=sum(os.path.getsize(f) for f in files),
    )


# -- decode on one core -------------------------------------------------------------------------


def decode_rate(shards: Shards, out_size: int, min_seconds: float) -> float:
    """Images/s of :func:`decode_images` over the shards' image column, in this process."""
    column = pq.read_table(shards.files, columns=["image"]).column("image").combine_chunks()
    decode_images(column[:32], shards.image_format, shards.image_shape, out_size)  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        decode_images(column, shards.image_format, shards.image_shape, out_size)
        done += len(column)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


# -- model consumption --------------------------------------------------------------------------


def train_step_seconds(args: argparse.Namespace, size: int, images: np.ndarray) -> list[float]:
    """Seconds of each timed train step of the default model at ``size`` px on image batches."""
    torch.manual_seed(0)
    defaults = ModelConfig()
    model = build_transfer_model(
        backbone=args.backbone,
        in_channels=3,
        small_input=default_small_input(size),
        weights=None,
        fusion_depth=defaults.fusion_depth,
        fusion_width=defaults.fusion_width,
        heads={"bench": NUM_CLASSES},
        head_dropout=defaults.head_dropout,
        fusion_dropout=defaults.fusion_dropout,
    ).to(args.device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(1)
    batches = [
        (
            torch.from_numpy(images[rng.integers(0, len(images), args.batch_size)]).permute(
                0, 3, 1, 2
            ),
            torch.from_numpy(rng.integers(0, NUM_CLASSES, args.batch_size)),
        )
        for _ in range(4)
    ]

    def step(i: int) -> None:
        uint8, y = batches[i % len(batches)]
        x = to_model_input(uint8.to(args.device), size, 3)  # (B, 3, size, size), no resize
        loss = F.cross_entropy(model(x)["bench"], y.to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the device

    for i in range(args.warmup_steps):
        step(i)
    seconds = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(i)
        seconds.append(time.perf_counter() - start)
    return seconds


# -- ingest -------------------------------------------------------------------------------------


@dataclass
class IngestStats:
    """Timed passes of one Ray Data stream."""

    rates: list[float]  # images/s from the pass's first decode in Ray Data to its last batch
    start_up: list[float]  # seconds from iter_batches to the pass's first decode

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


@dataclass(frozen=True)
class StampedDecode:
    """:class:`DecodeBatch` that also records when Ray Data started decoding each batch.

    The stamp is wall-clock time (one host, so comparable with this process's): the consuming
    loop cannot see when production starts, and Ray Data runs ahead of it while the first batch
    travels, so timing the stream from its first batch would count a backlog as throughput.
    """

    decode: DecodeBatch

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        out = self.decode(batch)
        return out.append_column("decode_start", pa.array(np.full(len(out), started)))


def ingest_pass(
    ds: ray.data.Dataset, shape: tuple[int, int, int], batch_size: int, expected_rows: int
) -> tuple[float, float]:
    """One pass as the worker consumes it: returns (start-up seconds, images/s).

    Images/s counts from the first decode in Ray Data (its executor started, the first file read)
    to the last batch in this loop, so it includes decoding, the hand-off to this process and the
    loop's own ``decode_uint8``; start-up is the time from ``iter_batches`` to that first decode.
    """
    start = time.time()
    rows, first_decode = 0, math.inf
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        images = decode_uint8(batch["image"], shape)  # (B, C, H, W) uint8
        labels = torch.tensor(batch["label"].to_numpy())  # (B,) int64
        assert len(images) == len(labels)
        rows += len(images)
        first_decode = min(first_decode, pa.compute.min(batch["decode_start"]).as_py())
    end = time.time()
    if rows != expected_rows:
        raise RuntimeError(f"the stream delivered {rows} rows, expected {expected_rows}")
    return first_decode - start, rows / (end - first_decode)


def measure_ingest(
    shards: Shards, out_size: int, batch_size: int, min_seconds: float
) -> IngestStats:
    """Warm-up pass, then passes until ``min_seconds`` (at least two) of the decoded stream."""
    decode = DecodeBatch(shards.image_format, shards.image_shape, out_size=out_size)
    ds = ray.data.read_parquet(shards.files).map_batches(
        StampedDecode(decode), batch_format="pyarrow"
    )
    ingest_pass(ds, decode.image_shape, batch_size, shards.rows)
    stats = IngestStats([], [])
    start = time.perf_counter()
    while len(stats.rates) < 2 or time.perf_counter() - start < min_seconds:
        start_up, rate = ingest_pass(ds, decode.image_shape, batch_size, shards.rows)
        stats.start_up.append(start_up)
        stats.rates.append(rate)
    return stats


# -- run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row of the table: stored format and size, delivered size."""

    image_format: str
    stored: int
    delivered: int

    @property
    def label(self) -> str:
        return f"{self.image_format} {self.stored}->{self.delivered}"


CASES = (
    Case("raw", SMALL, SMALL),
    Case("jpeg", SMALL, SMALL),
    Case("raw", LARGE, LARGE),
    Case("jpeg", LARGE, LARGE),
    Case("jpeg", LARGE, SMALL),  # the dataset stored large, the model small: Ray Data resizes
)
HEADLINE = Case("jpeg", LARGE, LARGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Images, shards, one-core decode, consumption, then ingest on a private Ray; the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Ray Data's INFO line per execution would bury the table; so would "progress bars disabled"
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__} | ray {ray.__version__} | python "
        f"{platform.python_version()} | {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable) | load average {os.getloadavg()[0]:.2f}"
    )
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtlray-ingest-") as tmp:
        large = photo_crops(args.images, LARGE)
        images = {LARGE: large, SMALL: shrink(large, SMALL)}
        labels = np.random.default_rng(2).integers(0, NUM_CLASSES, args.images)
        shards = {
            (fmt, size): write_shards(
                images[size], labels, fmt, Path(tmp) / f"{fmt}-{size}", args.shards
            )
            for fmt in ("raw", "jpeg")
            for size in SIZES
        }
        print(
            f"{args.images} photo crops ({len(bundled_photos())} bundled photographs), "
            f"{args.shards} shards per dataset, JPEG quality {JPEG_QUALITY}; "
            f"made in {time.perf_counter() - begin:.1f} s"
        )

        print("\ndecode_images on one core (this process), images/s")
        for fmt, stored, out in (
            ("jpeg", LARGE, LARGE),
            ("jpeg", LARGE, SMALL),
            ("raw", LARGE, SMALL),
        ):
            rate = decode_rate(shards[(fmt, stored)], out, min(2.0, args.seconds))
            print(f"  {fmt:<5} {stored} -> {out:<4} {rate:8.0f}")

        print(
            f"\nmodel consumption: {args.backbone}, fusion depth {ModelConfig().fusion_depth}, "
            f"batch {args.batch_size}, {args.device}, {args.threads} torch threads, "
            f"{args.warmup_steps} warm-up + {args.steps} timed steps ...",
            flush=True,
        )
        steps_before = {size: train_step_seconds(args, size, images[size]) for size in SIZES}
        print_steps("before Ray", args.batch_size, steps_before)
        print(f"\ningest on a private local Ray of {args.cpus} CPUs ...", flush=True)
        init_ray(None, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            ingest = {
                case: measure_ingest(
                    shards[(case.image_format, case.stored)],
                    case.delivered,
                    args.batch_size,
                    args.seconds,
                )
                for case in CASES
            }
        finally:
            ray.shutdown()

        print("\nmodel consumption again, after Ray stopped")
        steps_after = {size: train_step_seconds(args, size, images[size]) for size in SIZES}
        print_steps("after Ray", args.batch_size, steps_after)
        # the median step over both runs: robust to a burst of other work on the machine
        consumption = {
            size: args.batch_size / statistics.median(steps_before[size] + steps_after[size])
            for size in SIZES
        }
        headline = print_table(args, shards, consumption, ingest)
    print(f"wall {time.perf_counter() - begin:.0f} s")
    print(f"INGEST RATIO = {headline:.2f}")
    return 0


def print_steps(when: str, batch_size: int, steps: dict[int, list[float]]) -> None:
    """Samples/s of the median train step per size."""
    for size, seconds in steps.items():
        print(
            f"  {when}: {size:>3} px (small_input={default_small_input(size)}): "
            f"{batch_size / statistics.median(seconds):8.1f} samples/s (median of "
            f"{len(seconds)} steps, {min(seconds):.2f}-{max(seconds):.2f} s each)"
        )


def print_table(
    args: argparse.Namespace,
    shards: dict[tuple[str, int], Shards],
    consumption: dict[int, float],
    ingest: dict[Case, IngestStats],
) -> float:
    """The side-by-side table and the bytes ratio; returns the headline ratio."""
    print(
        f"\n{'stored -> delivered':<20}{'B/img rows':>11}{'B/img file':>11}{'ingest/s':>10}"
        f"{'start-up':>10}{'model/s':>9}{'ratio':>8}{'per CPU':>9}"
    )
    for case, stats in ingest.items():
        stored = shards[(case.image_format, case.stored)]
        ratio = stats.rate / consumption[case.delivered]
        print(
            f"{case.label:<20}{stored.encoded_bytes / args.images:>11.0f}"
            f"{stored.file_bytes / args.images:>11.0f}{stats.rate:>10.0f}"
            f"{statistics.median(stats.start_up):>9.2f}s"
            f"{consumption[case.delivered]:>9.1f}{ratio:>8.1f}{ratio / args.cpus:>9.1f}"
        )
    print(
        f"(ingest: median over {min(len(s.rates) for s in ingest.values())}+ timed passes of "
        f"{args.images} images, from the first decode in Ray Data to the last batch in the loop; "
        f"start-up: iter_batches to the first decode; Ray Data on "
        f"{args.cpus} CPUs, the consuming loop beside it; per CPU = ratio / {args.cpus})"
    )
    raw, jpeg = shards[("raw", LARGE)], shards[("jpeg", LARGE)]
    print(
        f"bytes per image at {LARGE} px: raw {raw.encoded_bytes / args.images:.0f} rows / "
        f"{raw.file_bytes / args.images:.0f} file, jpeg {jpeg.encoded_bytes / args.images:.0f} "
        f"/ {jpeg.file_bytes / args.images:.0f}"
    )
    print(
        f"BYTES JPEG/raw at {LARGE} px = {jpeg.encoded_bytes / raw.encoded_bytes:.3f} rows, "
        f"{jpeg.file_bytes / raw.file_bytes:.3f} files  (goal <= 0.2)"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on this machine)")
    return ingest[HEADLINE].rate / consumption[HEADLINE.delivered]


if __name__ == "__main__":
    sys.exit(main())
