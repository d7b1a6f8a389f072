"""What a Ray Train worker holds while it trains: where it runs, and its data.

A split (or this rank's shard of it) is decoded once into uint8 tensors at the stored size, or,
when too large for memory, streamed from Ray Data every epoch. Every step takes from every task
a share of the batch proportional to the task's size, converted to the model input on the
worker's device (and augmented when the stage asks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtlray.data import decode_uint8, to_model_input
from dtlray.stages import DatasetMeta, StageSpec, TaskSpec

_DECODE_BATCH_ROWS = 4096


@dataclass
class WorkerEnv:
    """Where this worker runs."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    image_size: int
    channels: int
    log: Callable[[str], None] = field(default=functools.partial(print, flush=True))


@dataclass
class InMemorySplit:
    """A split (or this rank's shard of it) decoded once to uint8 at the stored size."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class StreamingSplit:
    """A train shard too large for memory: Ray Data streams it again every epoch."""

    key: str
    meta: DatasetMeta


def read_shard(key: str, meta: DatasetMeta) -> InMemorySplit:
    """Decode this worker's shard of dataset ``key`` into memory (uint8, stored size)."""
    shard = ray.train.get_dataset_shard(key)
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=_DECODE_BATCH_ROWS, batch_format="pyarrow"):
        images.append(decode_uint8(batch["image"], meta.image_shape))
        labels.append(torch.from_numpy(batch["label"].to_numpy().astype(np.int64)))
    if not images:
        h, w, c = meta.image_shape
        return InMemorySplit(torch.empty(0, c, h, w, dtype=torch.uint8), torch.empty(0).long())
    return InMemorySplit(torch.cat(images), torch.cat(labels))


def train_source(
    task: TaskSpec, spec: StageSpec, stream_keys: tuple[str, ...]
) -> InMemorySplit | StreamingSplit:
    if task.train_key in stream_keys:
        if len(spec.tasks) != 1:
            raise RuntimeError("streaming train data is supported for single-task stages only")
        return StreamingSplit(task.train_key, task.meta)
    return read_shard(task.train_key, task.meta)


def model_input(images: torch.Tensor, env: WorkerEnv, augment: bool) -> torch.Tensor:
    x = to_model_input(images.to(env.device, non_blocking=True), env.image_size, env.channels)
    return _augment(x) if augment else x


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Per-sample random translation by up to ±1/8 of the image side (±4 px at 32 px; bilinear,
    reflection padding) and a horizontal flip with p=0.5, vectorised."""
    b = x.shape[0]  # x: (B, C, H, W)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    flip = torch.where(torch.rand(b, device=x.device) < 0.5, -1.0, 1.0)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(b, 2, device=x.device) * 2 - 1) * 0.25
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def step_batches(
    spec: StageSpec,
    data: Mapping[str, InMemorySplit | StreamingSplit],
    epoch: int,
    env: WorkerEnv,
) -> Iterator[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Yield, per step, one (task, uint8 images, labels) batch for every task.

    Each step takes from every task a share of the batch proportional to the task's size, so an
    epoch is one pass over every target's train data and every head gets a gradient every step
    (which DDP requires).
    """
    batch_size = spec.optim.batch_size
    if len(spec.tasks) == 1 and isinstance(data[spec.tasks[0].name], StreamingSplit):
        task = spec.tasks[0]
        shard = ray.train.get_dataset_shard(task.train_key)
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=True,  # a batch of one would break BatchNorm in training mode
            local_shuffle_buffer_size=batch_size * 16,
            local_shuffle_seed=env.seed + 1000 * epoch + env.rank,
        ):
            images = decode_uint8(batch["image"], task.meta.image_shape)
            labels = torch.from_numpy(batch["label"].to_numpy().astype(np.int64))
            yield [(task.name, images, labels)]
        return

    splits = {name: split for name, split in data.items() if isinstance(split, InMemorySplit)}
    sizes = {name: len(split) for name, split in splits.items()}
    total = sum(sizes.values())
    # Floor, so every step has at least batch_size rows: BatchNorm in training mode cannot
    # normalise a batch of one, and a tiny last step would be a noisy update anyway.
    steps = max(1, total // batch_size)
    generator = torch.Generator().manual_seed(env.seed * 1_000_003 + epoch * 101 + env.rank)
    chunks = {}
    for name, size in sizes.items():
        order = torch.randperm(size, generator=generator)
        if size < steps:  # a tiny task: cycle so every step still has one of its examples
            order = order.repeat(math.ceil(steps / max(size, 1)))
        chunks[name] = torch.tensor_split(order, steps)
    for step in range(steps):
        yield [
            (name, splits[name].images[chunks[name][step]], splits[name].labels[chunks[name][step]])
            for name in splits
        ]


def agree_on_sizes(data: Mapping[str, InMemorySplit | StreamingSplit], env: WorkerEnv) -> None:
    # In-memory shards must be equal on every rank (Ray Data splits train with equal=True);
    # check it once per stage rather than hang in the first all-reduce if it ever is not.
    in_memory = [len(s) for s in data.values() if isinstance(s, InMemorySplit)]
    if env.world_size == 1 or not in_memory:
        return
    sizes = torch.tensor(in_memory, dtype=torch.int64, device=env.device)
    low, high = sizes.clone(), sizes.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"train shards differ across ranks ({low} vs {high}); DDP would hang")
