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
    load_info,
    open_split,
    prepare_builtin,
    read_split_table,
)
from dtlray.errors import DtlrayError
from dtlray.stages import DatasetMeta

log = logging.getLogger(__name__)

SMALL_SPLIT_BYTES = 256 * 2**20


def ensure_dataset(name: str, root: str | None) -> DatasetInfo:
    """Load a prepared dataset; prepare a built-in one on first use.

    Raises:
        DtlrayError: a user dataset that was never prepared (says how to prepare it).
    """
    try:
        return load_info(name, root)
    except DtlrayError:
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
) -> ray.data.Dataset | ArrowSplit:
    """A split: the whole split, its first ``rows`` rows, or the rows listed.

    Splits under :data:`SMALL_SPLIT_BYTES` are read once here and handed over in memory
    (``from_arrow``): every Ray Data read pipeline costs seconds of start-up on each pass, which
    dominates a trial whose targets are a few hundred images. Larger splits stream from Parquet.
    ``in_process``: always an :class:`ArrowSplit` (for a loop running in this process).
    """
    size = info.splits[split] * row_bytes(info)
    if size > SMALL_SPLIT_BYTES and not isinstance(rows, np.ndarray) and not in_process:
        ds = open_split(info, split, shuffle_files=split == "train")
        return ds if rows is None else ds.limit(rows)
    table = read_split_table(info, split)
    if isinstance(rows, np.ndarray):
        table = table.take(rows)
    elif rows is not None:
        table = table.slice(0, rows)
    return ArrowSplit(table) if in_process else ray.data.from_arrow(table)


def label_budget(info: DatasetInfo, cfg: TrialConfig) -> np.ndarray | None:
    """The rows of a target's train split the trial finetunes on (its label budget, for
    :func:`split_dataset`); None: all of them."""
    budget = cfg.stage2
    if budget.samples_per_class is None and budget.train_fraction is None:
        return None
    # The budget is chosen from the label column: stratified, seeded, so every trial with the
    # same seed finetunes on the same examples.
    labels = read_split_table(info, "train").column("label").to_numpy()
    return select_label_budget(labels, budget.samples_per_class, budget.train_fraction, cfg.seed)


def split_rows(info: DatasetInfo, split: str, rows: np.ndarray | int | None = None) -> int:
    """How many rows ``split_dataset(info, split, rows)`` holds."""
    if isinstance(rows, np.ndarray):
        return len(rows)
    total = info.splits[split]
    return total if rows is None else min(rows, total)


def shard_mb(cfg: TrialConfig, info: DatasetInfo, rows: int) -> float:
    """Megabytes of each worker's shard of ``rows`` rows of a dataset (stored uint8)."""
    return rows * row_bytes(info) / 2**20 / cfg.resources.num_workers


def metas_for(infos: dict[str, DatasetInfo]) -> dict[str, DatasetMeta]:
    """What workers need to know of each dataset, by name."""
    return {
        name: DatasetMeta(
            name=info.name, num_classes=info.num_classes, image_shape=tuple(info.image_shape)
        )
        for name, info in infos.items()
    }


def row_bytes(info: DatasetInfo) -> int:
    """Bytes of one stored image (H * W * C uint8)."""
    h, w, c = info.image_shape
    return h * w * c


class SplitTrainOnlyDataConfig(ray.train.DataConfig):
    """Train splits are sharded equally (DDP needs equal steps); eval splits exactly once.

    Ray's default shards every split-listed dataset with ``equal=True``, which may drop rows, and
    hands unsplit ones whole to every worker. Evaluation wants each example counted exactly once,
    so val/test are sharded with ``equal=False`` and the workers all-reduce their sums.
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
        if world_size == 1:
            return super().configure(
                datasets, world_size, worker_handles, worker_node_ids, **kwargs
            )
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(
                world_size, equal=name in self._train_keys, locality_hints=worker_node_ids
            )
            for i, split in enumerate(splits):
                output[i][name] = split
        return output
