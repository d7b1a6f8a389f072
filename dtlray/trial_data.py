"""The trial's datasets: prepared on first use, the label budget applied, and handed to Ray
Train in memory or streaming, with evaluation splits sharded exactly once.

Small splits are read once on the driver and handed over in memory (every Ray Data read pipeline
costs seconds of start-up on each pass, which dominates a trial whose targets are a few hundred
images); larger ones stream from Parquet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train

from dtlray.config import TrialConfig
from dtlray.data import (
    BUILTIN_DATASETS,
    DatasetInfo,
    DatasetNotPrepared,
    load_info,
    open_split,
    prepare_builtin,
    read_split_labels,
    read_split_table,
)
from dtlray.data.codec import DecodeBatch
from dtlray.errors import DtlrayError
from dtlray.stages import DatasetMeta

log = logging.getLogger(__name__)

SMALL_SPLIT_BYTES = 256 * 2**20
DECODE_BLOCK_ROWS = 512  # rows per Ray Data block of an in-memory split that is decoded

DATA_TASK_CPUS = 0.1
"""CPUs a Ray Data read or decode task of a trial asks for when the trial's Train workers hold
nearly all of the cluster's CPUs (see :func:`data_task_options`)."""


def ensure_dataset(name: str, root: str | None) -> DatasetInfo:
    """Load a prepared dataset; prepare a built-in one on first use.

    Raises:
        DtlrayError: a user dataset that was never prepared (says how to prepare it), or any
            other error of :func:`~dtlray.data.load_info` (a bad ``dataset.json``, a bucket
            that cannot be reached), which no prepare would mend.
    """
    try:
        return load_info(name, root)
    except DatasetNotPrepared:
        if name not in BUILTIN_DATASETS:
            raise
    log.info("dataset %r is not prepared yet; preparing it now (once)", name)
    return prepare_builtin(name, root)


def select_label_budget(
    labels: np.ndarray, samples_per_class: int | None, fraction: float | None, seed: int
) -> np.ndarray:
    """Indices of a stratified, seeded label budget: at most N per class, or a fraction of each.

    Every class keeps at least one example, so no target class disappears from training.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        if samples_per_class is not None:
            keep = min(samples_per_class, idx.size)
        elif fraction is not None:
            keep = max(1, round(idx.size * fraction))
        else:
            keep = idx.size
        chosen.append(idx[:keep])
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class ArrowSplit:
    """A split held as an Arrow table in this process, read the way a Ray Data shard is read.

    A one-worker trial that runs the loop in its own Tune trial reads its splits this way: a
    Ray Dataset would need Ray tasks (a CPU each) that a machine whose slots are all taken by
    trials cannot schedule.
    """

    table: pa.Table

    def iter_batches(self, *, batch_size: int, batch_format: str = "pyarrow") -> Iterator[pa.Table]:
        """Consecutive slices of ``batch_size`` rows, as ``pyarrow`` tables."""
        assert batch_format == "pyarrow", batch_format
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def split_dataset(
    info: DatasetInfo,
    split: str,
    rows: np.ndarray | int | None = None,
    *,
    in_process: bool = False,
    image_size: int | None = None,
    stream: bool = False,
    task_options: dict[str, Any] | None = None,
) -> ray.data.Dataset | ArrowSplit:
    """A split: the whole split, its first ``rows`` rows, or the rows listed.

    Splits under :data:`SMALL_SPLIT_BYTES` are read once here and handed over in memory
    (``from_arrow``): every Ray Data read pipeline costs seconds of start-up on each pass, which
    dominates a trial whose targets are a few hundred images. Larger splits, and those that
    ``stream`` (too large for a worker's memory), are read from Parquet by Ray Data tasks — on
    any node, straight from the data root — unless they are a list of rows (a label budget).
    ``in_process``: always an :class:`ArrowSplit` (for a loop running in this process).
    ``task_options``: :func:`data_task_options` (default: Ray Data's own, a CPU a task). Where
    they are fractional (no CPU spare beside the trial's workers) Parquet read tasks cannot run:
    a streamed split is then read here and streamed from memory, and a large one not at all.

    Encoded rows (PNG, JPEG) are decoded and resized to ``image_size`` (None: kept at the stored
    size) by :func:`decoder`: in Ray Data tasks ahead of the trainer, or here for an
    :class:`ArrowSplit`. Either way the worker receives raw rows of :func:`delivered_shape`.

    Raises:
        DtlrayError: a split over :data:`SMALL_SPLIT_BYTES` with fractional ``task_options``.
    """
    decode = decoder(info, image_size)
    options = task_options or {}
    read_tasks = not options  # Ray Data's defaults: a CPU is spare for its read tasks
    large = stored_mb(info, split) * 2**20 > SMALL_SPLIT_BYTES
    listed = isinstance(rows, np.ndarray)  # a label budget: taken from a table read here
    if large and not read_tasks and not listed and not in_process:
        raise DtlrayError(
            f"{info.name} {split} ({stored_mb(info, split):.0f} MB) is read by Ray Data tasks, "
            "which need a CPU beside the trial's Train workers, and they hold all of this "
            "cluster's CPUs: lower resources.num_workers or resources.cpus_per_worker, or add "
            "CPUs"
        )
    from_parquet = large or (stream and read_tasks)
    if from_parquet and not listed and not in_process:
        ds = open_split(
            info,
            split,
            # The first ``rows`` rows are the same rows every epoch (and those the in-memory
            # path takes): no file shuffle then, the workers' local buffer still shuffles.
            shuffle_files=split == "train" and rows is None,
        )
        ds = ds if rows is None else ds.limit(rows)
        if decode is None:
            return ds
        return ds.map_batches(decode, batch_format="pyarrow", **options)
    table = read_split_table(info, split)
    if listed:
        table = table.take(rows)
    elif rows is not None:
        table = table.slice(0, rows)
    if in_process:
        return ArrowSplit(table if decode is None else decode(table))
    if decode is None:
        return ray.data.from_arrow(table)
    # Blocks of a few hundred rows, so several Ray Data tasks decode at once.
    starts = range(0, table.num_rows, DECODE_BLOCK_ROWS)
    blocks = [table.slice(start, DECODE_BLOCK_ROWS) for start in starts]
    return ray.data.from_arrow(blocks or [table]).map_batches(
        decode, batch_format="pyarrow", **options
    )


def data_task_options(cfg: TrialConfig) -> dict[str, Any]:
    """``num_cpus`` and ``concurrency`` of a trial's Ray Data decode tasks.

    Empty (Ray Data's defaults, a CPU a task) where the cluster has a whole CPU beside the
    trial's Train workers, e.g. a GPU cluster, whose nodes the autoscaler adds. Otherwise (2
    workers x 0.9 CPUs on 2 cores) such tasks would never be scheduled and the trial would hang:
    they then ask for :data:`DATA_TASK_CPUS`, at most as many at once as the cluster has CPUs
    (they use whole cores while they run). Parquet read tasks do not run on a fraction of a CPU
    beside Train's workers in Ray 2.60 (measured: they starve), so then streamed splits are read
    on the driver (:func:`split_dataset`).
    """
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus - cfg.resources.num_workers * cfg.resources.cpus_per_worker >= 1:
        return {}
    return {"num_cpus": DATA_TASK_CPUS, "concurrency": max(1, int(cpus))}


def decoder(info: DatasetInfo, image_size: int | None) -> DecodeBatch | None:
    """How a trial delivers ``info``'s rows: raw rows as they are (the worker views them as a
    tensor without decoding), encoded ones through a :class:`~dtlray.data.codec.DecodeBatch`
    that decodes and resizes them to the model's ``image_size``; None for raw."""
    if info.image_format == "raw":
        return None
    return DecodeBatch(info.image_format, info.image_shape, image_size, dataset=info.name)


def delivered_shape(info: DatasetInfo, image_size: int | None) -> tuple[int, int, int]:
    """``(H, W, C)`` of the rows a worker receives of ``info`` (see :func:`decoder`)."""
    decode = decoder(info, image_size)
    return tuple(info.image_shape) if decode is None else decode.image_shape  # type: ignore[return-value]


def stored_mb(info: DatasetInfo, split: str) -> float:
    """Megabytes of a split's rows as stored (what reading it whole holds in memory): raw rows
    at ``H*W*C`` bytes each, encoded ones at their files' size."""
    if info.image_format == "raw":
        return info.splits[split] * row_bytes(info) / 2**20
    return sum(shard.bytes for shard in info.files[split]) / 2**20


def label_budget(info: DatasetInfo, cfg: TrialConfig) -> np.ndarray | None:
    """The rows of a target's train split the trial finetunes on (its label budget, for
    :func:`split_dataset`); None: all of them."""
    budget = cfg.stage2
    if budget.samples_per_class is None and budget.train_fraction is None:
        return None
    # The budget is chosen from the label column: stratified, seeded, so every trial with the
    # same seed finetunes on the same examples.
    labels = read_split_labels(info, "train")
    return select_label_budget(labels, budget.samples_per_class, budget.train_fraction, cfg.seed)


def split_rows(info: DatasetInfo, split: str, rows: np.ndarray | int | None = None) -> int:
    """How many rows ``split_dataset(info, split, rows)`` holds."""
    if isinstance(rows, np.ndarray):
        return len(rows)
    total = info.splits[split]
    return total if rows is None else min(rows, total)


def shard_mb(cfg: TrialConfig, info: DatasetInfo, rows: int) -> float:
    """Megabytes of each worker's shard of ``rows`` rows of a dataset, held as the uint8 rows
    the worker receives (:func:`delivered_shape`)."""
    h, w, c = delivered_shape(info, cfg.data.image_size)
    return rows * h * w * c / 2**20 / cfg.resources.num_workers


def metas_for(
    infos: dict[str, DatasetInfo], image_size: int | None = None
) -> dict[str, DatasetMeta]:
    """What workers need to know of each dataset, by name; the image shape is that of the rows
    they receive (:func:`delivered_shape` at the model's ``image_size``)."""
    return {
        name: DatasetMeta(
            name=info.name,
            num_classes=info.num_classes,
            image_shape=delivered_shape(info, image_size),
        )
        for name, info in infos.items()
    }


def row_bytes(info: DatasetInfo) -> int:
    """Bytes of one stored image's pixels (H * W * C uint8)."""
    h, w, c = info.image_shape
    return h * w * c


class SplitTrainOnlyDataConfig(ray.train.DataConfig):
    """Train splits are sharded equally (DDP needs equal steps); eval splits exactly once.

    Ray's default shards every split-listed dataset with ``equal=True``, which may drop rows, and
    hands unsplit ones whole to every worker. Evaluation wants each example counted exactly once,
    so val/test are sharded with ``equal=False`` and the workers all-reduce their sums. One
    worker gets every dataset whole, as a plain iterator: a split of one would cost a split
    coordinator actor per dataset (a process of its own) and change nothing.
    """

    def __init__(self, train_keys: Sequence[str]) -> None:
        super().__init__(datasets_to_split=list(train_keys))
        self._train_keys = set(train_keys)

    def configure(  # noqa: D102 - see ray.train.DataConfig.configure
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if world_size == 1:
                output[0][name] = ds.iterator()
                continue
            splits = ds.streaming_split(
                world_size, equal=name in self._train_keys, locality_hints=worker_node_ids
            )
            for i, split in enumerate(splits):
                output[i][name] = split
        return output
