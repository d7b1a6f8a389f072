"""One trial on the driver side: datasets, the stage-1 plan, and the ``TorchTrainer``.

Both stages run in **one** ``TorchTrainer`` (its worker-group start-up is ~14 s on a small
machine; paying it twice per trial would double a short trial's cost). The driver decides what
the workers cannot: which datasets they read (with the label budget applied), whether stage 1 is
computed or loaded from the stage-1 cache, and whether to use GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

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
from dtlray.ray_session import quiet_ray_data
from dtlray.stage1_cache import has_stage1, stage1_dir
from dtlray.stages import DatasetMeta, dataset_key, finetune_stage, pretrain_stage
from dtlray.train_loop import WorkerPlan, train_loop_per_worker

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


def _split_dataset(
    info: DatasetInfo, split: str, rows: np.ndarray | int | None = None
) -> ray.data.Dataset:
    """A split as a Ray Dataset: the whole split, its first ``rows`` rows, or the rows listed.

    Splits under :data:`SMALL_SPLIT_BYTES` are read once here and handed over in memory
    (``from_arrow``): every Ray Data read pipeline costs seconds of start-up on each pass, which
    dominates a trial whose targets are a few hundred images. Larger splits stream from Parquet.
    """
    size = info.splits[split] * _row_bytes(info)
    if size > SMALL_SPLIT_BYTES and not isinstance(rows, np.ndarray):
        ds = open_split(info, split, shuffle_files=split == "train")
        return ds if rows is None else ds.limit(rows)
    table = read_split_table(info, split)
    if isinstance(rows, np.ndarray):
        table = table.take(rows)
    elif rows is not None:
        table = table.slice(0, rows)
    return ray.data.from_arrow(table)


def _target_train(info: DatasetInfo, cfg: TrialConfig) -> ray.data.Dataset:
    budget = cfg.stage2
    if budget.samples_per_class is None and budget.train_fraction is None:
        return _split_dataset(info, "train")
    # The budget is chosen from the label column: stratified, seeded, so every trial with the
    # same seed finetunes on the same examples.
    labels = read_split_table(info, "train").column("label").to_numpy()
    keep = select_label_budget(labels, budget.samples_per_class, budget.train_fraction, cfg.seed)
    return _split_dataset(info, "train", keep)


def stage1_location(cfg: TrialConfig, storage_path: str) -> tuple[str, str] | None:
    """``(key, directory)`` of the trial's stage-1 result; None for ``stage2.init: scratch``."""
    if cfg.stage2.init == "scratch":
        return None
    source = ensure_dataset(cfg.data.source, cfg.data.root)
    key = cfg.stage1_key(source.fingerprint)
    return key, stage1_dir(storage_path, key)


def metas_for(infos: dict[str, DatasetInfo]) -> dict[str, DatasetMeta]:
    """What workers need to know of each dataset, by name."""
    return {
        name: DatasetMeta(
            name=info.name, num_classes=info.num_classes, image_shape=tuple(info.image_shape)
        )
        for name, info in infos.items()
    }


def _row_bytes(info: DatasetInfo) -> int:
    h, w, c = info.image_shape
    return h * w * c


def build_trainer(
    cfg: TrialConfig,
    *,
    storage_path: str,
    run_name: str,
    callbacks: Sequence[ray.train.UserCallback] = (),
    run_test: bool = True,
    stage1_mode: Literal["load", "compute"] | None = None,
    run_storage_path: str | None = None,
) -> tuple[TorchTrainer, WorkerPlan]:
    """Build the ``TorchTrainer`` that runs both stages of ``cfg``.

    Args:
        cfg: the trial.
        storage_path: absolute path or URI of the results (and the stage-1 cache).
        run_name: the Train run's name; keep it stable for a trial so a retry resumes.
        callbacks: Ray Train callbacks (Tune's ``TuneReportCallback`` in a search).
        run_test: evaluate test splits after the last epoch.
        stage1_mode: ``load`` or ``compute`` stage 1 as a search's single-flight claim decided;
            None: load it when it is stored, else compute it.
        run_storage_path: where the Train run writes (default ``storage_path``).

    Returns:
        The trainer and the plan its workers follow.
    """
    quiet_ray_data()
    root = cfg.data.root
    infos = {name: ensure_dataset(name, root) for name in cfg.data.targets}
    datasets: dict[str, ray.data.Dataset] = {}
    for name, info in infos.items():
        datasets[dataset_key("finetune", name, "train")] = _target_train(info, cfg)
        datasets[dataset_key("finetune", name, "val")] = _split_dataset(info, "val")
        if run_test:
            datasets[dataset_key("finetune", name, "test")] = _split_dataset(info, "test")

    stream_keys: list[str] = []
    if cfg.stage2.init == "scratch":
        mode, s1_dir = "none", None
    else:
        source = ensure_dataset(cfg.data.source, root)
        infos[source.name] = source
        s1_dir = stage1_dir(storage_path, cfg.stage1_key(source.fingerprint))
        mode = stage1_mode or ("load" if has_stage1(s1_dir) else "compute")
        if mode == "compute":
            rows = source.splits["train"]
            if cfg.data.source_max_rows is not None:
                rows = min(rows, cfg.data.source_max_rows)
            key = dataset_key("pretrain", source.name, "train")
            datasets[key] = _split_dataset(source, "train", cfg.data.source_max_rows)
            datasets[dataset_key("pretrain", source.name, "val")] = _split_dataset(source, "val")
            per_worker_mb = rows * _row_bytes(source) / cfg.resources.num_workers / 2**20
            if per_worker_mb > cfg.data.in_memory_max_mb:
                stream_keys.append(key)
    for name, info in infos.items():
        total_mb = info.splits["train"] * _row_bytes(info) / 2**20
        key = dataset_key("finetune", name, "train")
        # `key in datasets` leaves the source out: only target train splits are checked here.
        if key in datasets and total_mb > cfg.data.in_memory_max_mb:
            raise DtlrayError(
                f"target {name!r} ({total_mb:.0f} MB) exceeds data.in_memory_max_mb="
                f"{cfg.data.in_memory_max_mb}; finetuning keeps every target's train split in "
                "memory: raise data.in_memory_max_mb"
            )

    plan = WorkerPlan(
        datasets=metas_for(infos),
        stage1_mode=mode,  # type: ignore[arg-type]
        stage1_dir=s1_dir,
        stream_keys=tuple(stream_keys),
        run_test=run_test,
    )
    use_gpu = cfg.resources.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    stages = [finetune_stage(cfg, plan.datasets)]
    if mode == "compute":
        stages.append(pretrain_stage(cfg, plan.datasets))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": cfg.to_dict(), "plan": plan.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers,
            use_gpu=bool(use_gpu),
            resources_per_worker={"CPU": cfg.resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=run_storage_path or storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            # Train's INFO lines repeat every metric per epoch; rank 0's line already says it.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=SplitTrainOnlyDataConfig(
            train_keys=[k for s in stages for k in s.train_keys() if k in datasets]
        ),
    )
    return trainer, plan


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


def run_trainer(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, with a user error raised inside a worker shown as that error.

    Raises:
        DtlrayError: a worker failed on bad user input (its message names the fix).
    """
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        cause = _find_user_error(err)
        if cause is not None:
            raise DtlrayError(str(cause)) from err
        raise


def _find_user_error(err: BaseException) -> DtlrayError | None:
    seen: set[int] = set()
    stack: list[BaseException] = [err]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DtlrayError):
            return current
        for attr in ("__cause__", "__context__", "cause"):
            nested = getattr(current, attr, None)
            if isinstance(nested, BaseException):
                stack.append(nested)
        for nested in getattr(current, "worker_failures", {}).values():
            if isinstance(nested, BaseException):
                stack.append(nested)
    return None
