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
from typing import Literal

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from dtlray.config import TrialConfig
from dtlray.errors import DtlrayError
from dtlray.ray_session import quiet_ray_data
from dtlray.stage1_cache import has_stage1, stage1_dir
from dtlray.stages import dataset_key, finetune_stage, pretrain_stage
from dtlray.train_loop import train_loop_per_worker
from dtlray.trial_data import (
    SplitTrainOnlyDataConfig,
    ensure_dataset,
    metas_for,
    row_bytes,
    split_dataset,
    target_train,
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
        datasets[dataset_key("finetune", name, "train")] = target_train(info, cfg)
        datasets[dataset_key("finetune", name, "val")] = split_dataset(info, "val")
        if run_test:
            datasets[dataset_key("finetune", name, "test")] = split_dataset(info, "test")

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
            datasets[key] = split_dataset(source, "train", cfg.data.source_max_rows)
            datasets[dataset_key("pretrain", source.name, "val")] = split_dataset(source, "val")
            per_worker_mb = rows * row_bytes(source) / cfg.resources.num_workers / 2**20
            if per_worker_mb > cfg.data.in_memory_max_mb:
                stream_keys.append(key)
    for name, info in infos.items():
        total_mb = info.splits["train"] * row_bytes(info) / 2**20
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
