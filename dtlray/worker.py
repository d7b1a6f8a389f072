"""What a Ray Train worker holds while it trains: the driver's plan, where it runs, its data.

A split (or this rank's shard of it) is decoded once into uint8 tensors at the size it arrives
(the stored size of raw rows; the model's input size of PNG/JPEG rows, which Ray Data decoded), or,
when too large for memory, streamed from Ray Data every epoch. Every step takes from every task
a share of the batch proportional to the task's size -- the same share whether the task is held
or streamed -- converted to the model input on the worker's device (and augmented when the stage
asks).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dtlray.data import decode_uint8, to_model_input
from dtlray.errors import DtlrayError
from dtlray.metrics import STAGE1_MODE, STAGE1_REUSED_EPOCHS
from dtlray.stage1_claims import CpuLoan
from dtlray.stages import DatasetMeta, StageSpec, TaskSpec

_DECODE_BATCH_ROWS = 4096


# -- what the driver tells the workers ----------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """Driver-side decisions a worker follows (everything else is in the TrialConfig).

    Attributes:
        datasets: metadata of every dataset the trial reads, by name.
        stage1_mode: ``compute`` (run stage 1 and store it), ``load`` (a stored stage-1 result
            exists) or ``none`` (``stage2.init: scratch``).
        stage1_dir: where the stage-1 result is loaded from or saved to.
        stream_rows: the train datasets too large to keep in worker memory (streamed every
            epoch), by key: the rows of the whole dataset (a rank's shard of it is
            :func:`shard_rows`).
        run_test: evaluate the test splits after the last finetune epoch.
        checkpoint_epochs: finetune epochs (from 1) a checkpoint must be written after, beyond
            what ``resources.checkpoint`` asks: the search's scheduler rungs.
        test_every_epoch: evaluate the test splits after every finetune epoch, not only the last
            (the learning-curve benchmark records test accuracy per epoch; needs ``run_test``).
        stage1_tree_dir: for a computed ``schedule: wsd`` stage 1, where its configuration's
            constant phases are stored (the stage tree); None otherwise.
    """

    datasets: dict[str, DatasetMeta]
    stage1_mode: Literal["compute", "load", "none"]
    stage1_dir: str | None
    stream_rows: dict[str, int] = field(default_factory=dict)
    run_test: bool = True
    checkpoint_epochs: tuple[int, ...] = ()
    test_every_epoch: bool = False
    stage1_tree_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WorkerPlan:
        datasets = {
            name: DatasetMeta(
                name=meta["name"],
                num_classes=int(meta["num_classes"]),
                image_shape=tuple(meta["image_shape"]),  # type: ignore[arg-type]
            )
            for name, meta in raw["datasets"].items()
        }
        return cls(
            datasets=datasets,
            stage1_mode=raw["stage1_mode"],
            stage1_dir=raw["stage1_dir"],
            stream_rows={key: int(rows) for key, rows in raw["stream_rows"].items()},
            run_test=bool(raw["run_test"]),
            checkpoint_epochs=tuple(raw["checkpoint_epochs"]),
            test_every_epoch=bool(raw["test_every_epoch"]),
            stage1_tree_dir=raw["stage1_tree_dir"],
        )


@dataclass
class Stage1Outcome:
    """What stage 1 contributes to every finetune report.

    Attributes:
        mode: ``computed`` (this trial pretrained), ``reused`` (loaded a stored stage 1) or
            ``scratch`` (``stage2.init: scratch``: no stage 1 at all).
        source_val_acc: stage 1's source validation accuracy; None for ``scratch``.
        seconds: spent by this trial on stage 1 (small when reused, 0 for scratch).
        compute_seconds: what computing the stage-1 result cost, whoever computed it.
        reused_epochs: stage-1 epochs this trial did not train because a stored result covered
            them: all for ``reused``, the stored constant phase it continued (the stage tree)
            for ``computed``, 0 for ``scratch``.
        logme: LogME of the stage-1 trunk's features on each target's train split, before any
            finetuning (``target/<task>/logme``; rank 0's shard under DDP).
    """

    mode: Literal["computed", "reused", "scratch"]
    source_val_acc: float | None
    seconds: float
    compute_seconds: float
    reused_epochs: float = 0  # a fraction when a stored constant phase ended mid-epoch
    logme: dict[str, float] = field(default_factory=dict)  # target/<task>/logme of the trunk

    def metrics(self) -> dict[str, Any]:
        """The stage-1 metrics of every finetune report; a scratch trial claims no stage 1."""
        metrics: dict[str, Any] = {
            STAGE1_MODE: self.mode,
            "stage1/seconds": self.seconds,
            "stage1/compute_seconds": self.compute_seconds,
        }
        if self.mode != "scratch":
            metrics["source/val_acc"] = self.source_val_acc
            metrics["stage1/cache_hit"] = self.mode == "reused"
            metrics[STAGE1_REUSED_EPOCHS] = self.reused_epochs
            metrics.update(self.logme)
        return metrics


class Diverged(Exception):
    """The loss became non-finite: the trial cannot recover, so it ends (and is not retried).

    Raised identically on every rank (the checks run on all-reduced values), so DDP ranks stay
    in step.

    Args:
        stage: ``pretrain`` or ``finetune``.
        epoch: the 1-based epoch it happened in.
        where: what went non-finite, e.g. ``step 3: the training loss``.
        loss: the loss value (``nan`` or ``inf``).
        lr: the stage's learning rate (the fix names it).
    """

    def __init__(self, stage: str, epoch: int, where: str, loss: float, lr: float) -> None:
        self.stage, self.epoch = stage, epoch
        knob = "stage1.lr" if stage == "pretrain" else "stage2.lr"
        self.reason = (
            f"diverged in {stage} epoch {epoch}, {where} is {loss} (not finite); lower the "
            f"learning rate ({knob}={lr:g}, e.g. to {lr / 10:g})"
        )
        super().__init__(self.reason)


class WorkerSession(Protocol):
    """What the worker loop needs from whatever runs it: its data, its last checkpoint, and a
    way to report an epoch. A TorchTrainer worker uses :class:`TrainSession`; a one-worker
    trial that runs the loop inside its Tune trial uses the search layer's session."""

    def dataset(self, key: str) -> Any:
        """This worker's shard of dataset ``key`` (anything with ``iter_batches``)."""

    def checkpoint(self) -> Any:
        """The checkpoint to resume from (anything with ``as_directory()``), or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report one epoch's metrics, with the checkpoint written to ``checkpoint_dir``."""


class TrainSession:
    """A Ray Train worker of a ``TorchTrainer``: ``ray.train``'s shards, checkpoints, reports."""

    def dataset(self, key: str) -> Any:  # noqa: D102
        return ray.train.get_dataset_shard(key)

    def checkpoint(self) -> Any:  # noqa: D102
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:  # noqa: D102
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Every rank calls report (it is a barrier); only rank 0 attaches a checkpoint.
        ray.train.report(metrics, checkpoint=checkpoint)


def resolve_precision(
    precision: str, device: torch.device, channels_last: bool = True
) -> dict[str, Any]:
    """``amp_dtype`` and ``channels_last`` of a :class:`WorkerEnv` for ``resources.precision``
    and ``resources.channels_last``.

    Raises:
        DtlrayError: fp16 on a CPU (its autocast computes in bfloat16; use bf16 or fp32).
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if not cuda:
            raise DtlrayError(
                "resources.precision=fp16 needs a GPU (CPU autocast runs in bfloat16); use bf16 "
                "or fp32 on CPU, or auto"
            )
        dtype = torch.float16
    else:
        dtype = None
    return {"amp_dtype": dtype, "channels_last": channels_last}


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout ``resources.channels_last`` asks for, of weights and images alike."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _say(line: str) -> None:
    # Not print(): Ray Train V2 patches print in workers to log through the root logger as
    # well, and a worker whose stdout Ray wraps then prints every line twice (stdout + stderr).
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class WorkerEnv:
    """Where this worker runs."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    image_size: int
    channels: int
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    channels_last: bool = False  # NHWC weights and images (oneDNN's and cuDNN's fast layout)
    log: Callable[[str], None] = field(default=_say)
    session: WorkerSession | None = None  # None: evaluation outside any trial
    threads: int = 1  # torch threads of its own (the CPUs Ray gave it)
    loan: CpuLoan | None = None  # CPUs lent by trials waiting for this one's stage 1

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of this worker's weights and images."""
        return memory_format(self.channels_last)


def follow_loan(env: WorkerEnv) -> None:
    """Train on this worker's own threads plus one per CPU lent to it right now (a no-op
    without a loan). Called before every step: torch's thread count is per calling thread."""
    if env.loan is None:
        return
    want = max(1, min(os.cpu_count() or 1, env.threads + round(env.loan.cpus)))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


@dataclass
class InMemorySplit:
    """A split (or this rank's shard of it) decoded once to uint8 at the size it arrives."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class StreamingSplit:
    """A train shard too large for memory: Ray Data streams it again every epoch.

    ``rows`` is the shard's size, known before it is read (see :func:`shard_rows`): the steps of
    an epoch are counted from it, identically on every rank.
    """

    key: str
    meta: DatasetMeta
    rows: int

    def __len__(self) -> int:
        return self.rows


def shard_rows(rows: int, world_size: int) -> int:
    """Rows of each rank's shard of a ``rows``-row train dataset.

    Train splits are sharded with ``streaming_split(world_size, equal=True)``; in Ray 2.60 its
    ``OutputSplitter`` gives every rank ``rows // world_size`` rows and drops the remainder (at
    most ``world_size - 1`` rows an epoch: the last to arrive, so the same rows of an in-memory
    dataset every epoch, and other ones each epoch of a Parquet stream that shuffles its files).
    An in-memory shard loses the same rows once, when it is read.
    """
    return rows // world_size


def read_shard(shard: Any, meta: DatasetMeta) -> InMemorySplit:
    """Decode this worker's ``shard`` of a dataset into memory (uint8, ``meta.image_shape``)."""
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=_DECODE_BATCH_ROWS, batch_format="pyarrow"):
        images.append(decode_uint8(batch["image"], meta.image_shape))
        labels.append(torch.from_numpy(batch["label"].to_numpy().astype(np.int64)))
    if not images:
        h, w, c = meta.image_shape
        return InMemorySplit(torch.empty(0, c, h, w, dtype=torch.uint8), torch.empty(0).long())
    return InMemorySplit(torch.cat(images), torch.cat(labels))


def train_source(
    task: TaskSpec, stream_rows: Mapping[str, int], env: WorkerEnv
) -> InMemorySplit | StreamingSplit:
    """A task's train shard: streamed when the plan says so (``stream_rows``), else read into
    memory now."""
    if task.train_key in stream_rows:
        rows = shard_rows(stream_rows[task.train_key], env.world_size)
        return StreamingSplit(task.train_key, task.meta, rows)
    assert env.session is not None
    return read_shard(env.session.dataset(task.train_key), task.meta)


def model_input(images: torch.Tensor, env: WorkerEnv, augment: bool) -> torch.Tensor:
    x = to_model_input(images.to(env.device, non_blocking=True), env.image_size, env.channels)
    x = _augment(x) if augment else x
    return x.contiguous(memory_format=env.memory_format)


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


def chunk_sizes(rows: int, steps: int) -> list[int]:
    """How many of a task's ``rows`` each of an epoch's ``steps`` takes: ``torch.tensor_split``'s
    sections (the first ``rows % steps`` steps take one more)."""
    base, extra = divmod(rows, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def epoch_steps(spec: StageSpec, data: Mapping[str, InMemorySplit | StreamingSplit]) -> int:
    """The optimizer steps of one epoch over ``data`` (the same on every rank)."""
    # Floor, so every step has at least batch_size rows: BatchNorm in training mode cannot
    # normalise a batch of one, and a tiny last step would be a noisy update anyway.
    return max(1, sum(len(data[t.name]) for t in spec.tasks) // spec.optim.batch_size)


def step_batches(
    spec: StageSpec,
    data: Mapping[str, InMemorySplit | StreamingSplit],
    epoch: int,
    env: WorkerEnv,
) -> Iterator[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Yield, per step, one (task, uint8 images, labels) batch for every task.

    Each step takes from every task a share of the batch proportional to the task's size, so an
    epoch is one pass over every task's shard and every head gets a gradient every step (which
    DDP requires). The steps are counted from the shard sizes alone, so every rank takes the
    same number. A streamed task's share of each step is the same as if it were held in memory:
    its rows arrive from Ray Data (shuffled through a local buffer, a new seed every epoch and
    rank) and are re-cut to those sizes. A task with fewer rows than steps cycles through its
    rows (a streamed one is read into memory for the epoch first: it is that small).
    """
    batch_size = spec.optim.batch_size
    steps = epoch_steps(spec, data)
    seed = env.seed * 1_000_003 + epoch * 101 + env.rank
    generator = torch.Generator().manual_seed(seed)
    chunks: dict[str, Iterator[tuple[torch.Tensor, torch.Tensor]]] = {}
    for index, task in enumerate(spec.tasks):
        split = data[task.name]
        if isinstance(split, StreamingSplit):
            assert env.session is not None
            shard = env.session.dataset(split.key)
            if len(split) >= steps:
                # A seed per task as well: equal-sized shards must not be shuffled alike.
                shuffle_seed = seed * 64 + index
                chunks[task.name] = _streamed_chunks(split, shard, steps, batch_size, shuffle_seed)
                continue
            split = read_shard(shard, split.meta)
        chunks[task.name] = _in_memory_chunks(split, steps, generator)
    for _ in range(steps):
        yield [(name, *next(task_chunks)) for name, task_chunks in chunks.items()]


def _in_memory_chunks(
    split: InMemorySplit, steps: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # The permutation is drawn now, task after task, not when the first step asks for it.
    order = torch.randperm(len(split), generator=generator)
    if len(split) < steps:  # a tiny task: cycle so every step still has one of its examples
        order = order.repeat(math.ceil(steps / max(len(split), 1)))
    return ((split.images[i], split.labels[i]) for i in order.split(chunk_sizes(len(order), steps)))


def _streamed_chunks(
    split: StreamingSplit, shard: Any, steps: int, batch_size: int, shuffle_seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over a streamed shard, cut into the steps' shares of it (shuffled through a
    buffer of 16 steps' batches).

    Raises:
        RuntimeError: the shard did not hold the ``split.rows`` rows the plan counted on (the
            ranks' step counts would disagree, or rows would go unseen).
    """
    sizes = chunk_sizes(split.rows, steps)
    batches = iter(
        shard.iter_batches(
            batch_size=sizes[0],
            batch_format="pyarrow",
            local_shuffle_buffer_size=batch_size * 16,
            local_shuffle_seed=shuffle_seed,
        )
    )
    images = torch.empty(0, *_chw(split.meta), dtype=torch.uint8)
    labels = torch.empty(0, dtype=torch.int64)
    seen = 0
    for step, size in enumerate(sizes):
        while labels.shape[0] < size:
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(
                    f"the streamed train shard {split.key!r} ended after {seen} rows; the plan "
                    f"counted {split.rows}"
                )
            seen += batch.num_rows
            images = torch.cat([images, decode_uint8(batch["image"], split.meta.image_shape)])
            batch_labels = torch.from_numpy(batch["label"].to_numpy().astype(np.int64))
            labels = torch.cat([labels, batch_labels])
        if step == steps - 1:
            # Read to the end before the last step: the next epoch's pass starts only once this
            # one finished on every rank, and a row too many means the count was wrong.
            seen += sum(batch.num_rows for batch in batches)
            if seen != split.rows:
                raise RuntimeError(
                    f"the streamed train shard {split.key!r} held {seen} rows; the plan counted "
                    f"{split.rows}"
                )
        yield images[:size], labels[:size]
        images, labels = images[size:], labels[size:]


def _chw(meta: DatasetMeta) -> tuple[int, int, int]:
    h, w, c = meta.image_shape
    return c, h, w


def agree_on_sizes(data: Mapping[str, InMemorySplit | StreamingSplit], env: WorkerEnv) -> None:
    """Check once per stage that every rank holds train shards of the same sizes.

    ``step_batches`` counts an epoch's steps from them, and DDP all-reduces every step: ranks
    that disagree would hang in the first all-reduce. In-memory shards are counted as read (Ray
    Data splits train with ``equal=True``), streamed ones as the plan counted them (each epoch's
    pass then checks that the shard held that many).

    Raises:
        RuntimeError: the sizes differ across ranks.
    """
    if env.world_size == 1:
        return
    sizes = torch.tensor(
        [len(split) for split in data.values()], dtype=torch.int64, device=env.device
    )
    low, high = sizes.clone(), sizes.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"train shards differ across ranks ({low} vs {high}); DDP would hang")
