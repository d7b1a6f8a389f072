"""One trial on the driver side: the stage-1 plan and the ``TorchTrainer`` (its datasets are
built by :mod:`dtlray.trial_data`; the Ray session is :mod:`dtlray.ray_session`).

Both stages run in **one** ``TorchTrainer`` (its worker-group start-up is ~14 s on a small
machine; paying it twice per trial would double a short trial's cost). The driver decides what
the workers cannot: which datasets they read (with the label budget applied), whether stage 1 is
computed or loaded from the stage-1 cache, and whether to use GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from dtlray.config import TrialConfig
from dtlray.data import DatasetInfo
from dtlray.errors import DtlrayError
from dtlray.ray_session import quiet_ray_data
from dtlray.stage1_cache import has_stage1, stage1_dir, tree_dir
from dtlray.stages import dataset_key, finetune_stage, pretrain_stage
from dtlray.train_loop import train_loop_per_worker
from dtlray.trial_data import (
    ArrowSplit,
    SplitTrainOnlyDataConfig,
    data_task_options,
    ensure_dataset,
    label_budget,
    metas_for,
    shard_mb,
    split_dataset,
    split_rows,
)
from dtlray.worker import WorkerPlan

log = logging.getLogger(__name__)


def stage1_location(cfg: TrialConfig, storage_path: str) -> tuple[str, str] | None:
    """``(key, directory)`` of the trial's stage-1 result; None for ``stage2.init: scratch``."""
    if cfg.stage2.init == "scratch":
        return None
    source = ensure_dataset(cfg.data.source, cfg.data.root)
    key = cfg.stage1_key(source.fingerprint)
    return key, stage1_dir(storage_path, key)


@dataclass(frozen=True)
class TrialPlan:
    """What a trial's workers run: the plan they follow and the datasets they read.

    Attributes:
        cfg: the trial.
        plan: the workers' plan.
        datasets: Ray Datasets by key (the label budget applied).
        train_keys: the keys sharded across workers (the train splits).
        use_gpu: whether the trial trains on GPUs (``auto`` resolved against the cluster).
    """

    cfg: TrialConfig
    plan: WorkerPlan
    datasets: dict[str, ray.data.Dataset | ArrowSplit]
    train_keys: tuple[str, ...]
    use_gpu: bool

    @property
    def worker_config(self) -> dict[str, Any]:
        """The worker loop's argument: ``{"trial": ..., "plan": ...}`` as plain dicts."""
        return {"trial": self.cfg.to_dict(), "plan": self.plan.to_dict()}


def resolve_use_gpu(cfg: TrialConfig) -> bool:
    """Whether the trial trains on GPUs: ``resources.use_gpu``, ``auto`` meaning "the cluster
    has some" (asked now: an autoscaling cluster may add them later, see the README)."""
    if cfg.resources.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.resources.use_gpu)


def runs_in_trial(cfg: TrialConfig) -> bool:
    """Whether a search trial runs the worker loop in its own process instead of a
    ``TorchTrainer``: one worker (no DDP), and no train split that streams (the in-process loop
    reads its splits whole; streaming needs Ray Data tasks)."""
    if cfg.resources.num_workers != 1:
        return False
    return not stream_rows(cfg, train_splits(cfg, source=cfg.stage2.init != "scratch"))


TrainSplits = dict[str, tuple[DatasetInfo, np.ndarray | int | None]]
"""Train dataset keys -> the dataset and which of its rows the trial trains on (the ``rows`` of
:func:`~dtlray.trial_data.split_dataset`)."""


def train_splits(cfg: TrialConfig, *, source: bool) -> TrainSplits:
    """The trial's train splits: every target's under the label budget and, with ``source``,
    the source's first ``data.source_max_rows``."""
    splits: TrainSplits = {}
    for name in cfg.data.targets:
        info = ensure_dataset(name, cfg.data.root)
        splits[dataset_key("finetune", name, "train")] = (info, label_budget(info, cfg))
    if source:
        info = ensure_dataset(cfg.data.source, cfg.data.root)
        splits[dataset_key("pretrain", info.name, "train")] = (info, cfg.data.source_max_rows)
    return splits


def stream_rows(cfg: TrialConfig, splits: TrainSplits) -> dict[str, int]:
    """The train splits that stream -- those whose shard per worker exceeds
    ``data.in_memory_max_mb`` (``0``: all of them) -- with their rows (a
    :attr:`~dtlray.worker.WorkerPlan.stream_rows`)."""
    rows = {key: split_rows(info, "train", chosen) for key, (info, chosen) in splits.items()}
    return {
        key: n
        for key, n in rows.items()
        if shard_mb(cfg, splits[key][0], n) > cfg.data.in_memory_max_mb
    }


def plan_trial(
    cfg: TrialConfig,
    *,
    storage_path: str,
    run_test: bool = True,
    stage1_mode: Literal["load", "compute"] | None = None,
    in_process: bool = False,
    checkpoint_epochs: Sequence[int] = (),
) -> TrialPlan:
    """Decide what the trial's workers do: which datasets they read (label budget applied),
    whether stage 1 is computed or loaded, which train splits stream, whether to use GPUs.

    Args:
        cfg: the trial.
        storage_path: absolute path or URI of the results (and the stage-1 cache).
        run_test: evaluate test splits after the last epoch.
        stage1_mode: ``load`` or ``compute`` stage 1 as a search's single-flight claim decided;
            None: load it when it is stored, else compute it.
        in_process: the loop runs in this process (:func:`runs_in_trial`, so nothing streams):
            splits are :class:`~dtlray.trial_data.ArrowSplit` tables, not Ray Datasets.
        checkpoint_epochs: finetune epochs that must write a checkpoint (a scheduler's rungs).

    Raises:
        DtlrayError: a dataset is not prepared, or a streamed source's stage-1 budget ends
            mid-epoch.
    """
    quiet_ray_data()
    root = cfg.data.root
    infos = {name: ensure_dataset(name, root) for name in cfg.data.targets}
    s1_tree: str | None = None
    if cfg.stage2.init == "scratch":
        mode, s1_dir = "none", None
    else:
        source = ensure_dataset(cfg.data.source, root)
        infos[source.name] = source
        s1_dir = stage1_dir(storage_path, cfg.stage1_key(source.fingerprint))
        mode = stage1_mode or ("load" if has_stage1(s1_dir) else "compute")
        tree_key = cfg.stage1_tree_key(source.fingerprint)
        if mode == "compute" and tree_key is not None:
            s1_tree = tree_dir(storage_path, tree_key)

    splits = train_splits(cfg, source=mode == "compute")
    streams = stream_rows(cfg, splits)
    assert not (in_process and streams), "runs_in_trial keeps a trial that streams out"
    source_key = dataset_key("pretrain", cfg.data.source, "train")
    if source_key in streams and not isinstance(cfg.stage1.epochs, int):
        raise DtlrayError(
            f"stage1.epochs={cfg.stage1.epochs} ends mid-epoch, but the source "
            f"{cfg.data.source!r} streams (its train shard per worker is over "
            f"data.in_memory_max_mb={cfg.data.in_memory_max_mb}) and a stream is read in whole "
            "passes: use a whole number of stage-1 epochs, or raise data.in_memory_max_mb"
        )
    read = {
        "in_process": in_process,
        "image_size": cfg.data.image_size,  # encoded images are decoded to it ahead of the workers
        "task_options": None if in_process else data_task_options(cfg),
    }
    datasets: dict[str, ray.data.Dataset | ArrowSplit] = {
        key: split_dataset(info, "train", rows, stream=key in streams, **read)
        for key, (info, rows) in splits.items()
    }
    for name in cfg.data.targets:
        for split in ("val", "test") if run_test else ("val",):
            datasets[dataset_key("finetune", name, split)] = split_dataset(
                infos[name], split, **read
            )
    if mode == "compute":
        datasets[dataset_key("pretrain", source.name, "val")] = split_dataset(
            source, "val", cfg.data.source_val_max_rows, **read
        )

    plan = WorkerPlan(
        datasets=metas_for(infos, cfg.data.image_size),
        stage1_mode=mode,  # type: ignore[arg-type]
        stage1_dir=s1_dir,
        stream_rows=streams,
        run_test=run_test,
        checkpoint_epochs=tuple(sorted(checkpoint_epochs)),
        stage1_tree_dir=s1_tree,
    )
    stages = [finetune_stage(cfg, plan.datasets)]
    if mode == "compute":
        stages.append(pretrain_stage(cfg, plan.datasets))
    return TrialPlan(
        cfg=cfg,
        plan=plan,
        datasets=datasets,
        train_keys=tuple(k for s in stages for k in s.train_keys() if k in datasets),
        use_gpu=resolve_use_gpu(cfg),
    )


def build_trainer(
    cfg: TrialConfig,
    *,
    storage_path: str,
    run_name: str,
    callbacks: Sequence[ray.train.UserCallback] = (),
    run_test: bool = True,
    stage1_mode: Literal["load", "compute"] | None = None,
    run_storage_path: str | None = None,
    checkpoint_epochs: Sequence[int] = (),
) -> tuple[TorchTrainer, WorkerPlan]:
    """Build the ``TorchTrainer`` that runs both stages of ``cfg`` (see :func:`plan_trial`).

    Args:
        cfg: the trial.
        storage_path: absolute path or URI of the results (and the stage-1 cache).
        run_name: the Train run's name; keep it stable for a trial so a retry resumes.
        callbacks: Ray Train callbacks (Tune's ``TuneReportCallback`` in a search).
        run_test: evaluate test splits after the last epoch.
        stage1_mode: as in :func:`plan_trial`.
        run_storage_path: where the Train run writes (default ``storage_path``).
        checkpoint_epochs: as in :func:`plan_trial`.

    Returns:
        The trainer and the plan its workers follow.
    """
    trial = plan_trial(
        cfg,
        storage_path=storage_path,
        run_test=run_test,
        stage1_mode=stage1_mode,
        checkpoint_epochs=checkpoint_epochs,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=trial.worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers,
            use_gpu=trial.use_gpu,
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
        datasets=trial.datasets,
        dataset_config=SplitTrainOnlyDataConfig(train_keys=list(trial.train_keys)),
    )
    return trainer, trial.plan


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
