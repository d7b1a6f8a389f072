"""Tuner construction: searcher, scheduler, resources, storage — the only module using Ray Tune.

A trial is the function :func:`run_trial_fn` (Train V2's pattern: a Tune function that builds and
fits a ``TorchTrainer``). Tune samples the searched keys; the trial rebuilds the typed config from
the space's fixed values plus that sample, claims or reuses the stage-1 result, and runs both
stages in one trainer whose per-epoch reports reach Tune through ``TuneReportCallback``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from dtlray.config import TrialConfig
from dtlray.errors import DtlrayError
from dtlray.search_space import (
    BEST_FILE,
    RUNNING_FILE,
    SPACE_FILE,
    SearchSpace,
    load_space,
    parse_space,
    to_optuna_distributions,
)
from dtlray.stage1_claims import stage1_claim, start_claims
from dtlray.trial import build_trainer, resolve_storage_path, run_trainer, stage1_location

log = logging.getLogger(__name__)

# The Tune trial itself only waits on its trainer; its workers hold the real resources.
TRIAL_DRIVER_CPU = 0.01


def build_searcher(
    space: SearchSpace, study_name: str, study_storage: str | None = None
) -> OptunaSearch:
    """Optuna TPE (seeded) or Optuna's random sampler, optionally with a persistent study."""
    if space.searcher.type == "optuna":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=space.searcher.seed, n_startup_trials=space.searcher.n_startup_trials
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=space.searcher.seed)
    storage = None
    if study_storage is not None:
        storage = _optuna_storage(study_storage)
    return OptunaSearch(
        space=to_optuna_distributions(space),
        metric=space.objective.metric,
        mode=space.objective.mode,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
        # Start from the space's defaults: a known-reasonable point anchors the search.
        points_to_evaluate=[space.default_values()],
    )


def _optuna_storage(url: str) -> optuna.storages.BaseStorage:
    if url.endswith((".log", ".jsonl")) and "://" not in url:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    try:
        return optuna.storages.RDBStorage(url)
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as err:
        raise DtlrayError(
            f"--study-storage {url!r}: {err}; use an SQLAlchemy URL such as "
            "sqlite:///study.db, or a path ending in .log for a journal file"
        ) from None


def build_scheduler(space: SearchSpace) -> TrialScheduler:
    """ASHA over finetune epochs (a first rung that lets slow starters live), or FIFO."""
    if space.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",  # one Tune result per finetune epoch
        max_t=space.max_epochs,
        grace_period=space.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


def derive_max_concurrent_trials(space: SearchSpace) -> int:
    """How many trials fit in the cluster at once (the space's value, capped to what fits).

    A trial holds its workers' CPUs (and GPUs) plus a sliver for its Tune driver. Running more
    trials than fit only makes the extra ones wait for a worker group and time out every 60 s.
    """
    res = space.trial.resources
    cluster = ray.cluster_resources()
    per_trial_cpu = res.num_workers * res.cpus_per_worker + TRIAL_DRIVER_CPU
    fit = math.floor(cluster.get("CPU", 1.0) / per_trial_cpu)
    gpus = cluster.get("GPU", 0.0)
    if gpus > 0 and res.use_gpu in (True, "auto"):
        fit = min(fit, math.floor(gpus / res.num_workers))
    fit = max(1, fit)
    wanted = space.max_concurrent_trials or min(fit, space.num_samples)
    if wanted > fit:
        log.warning(
            "max_concurrent_trials=%d but the cluster fits %d trial(s) of %d worker(s) x %s "
            "CPU; running %d at a time (lower resources.cpus_per_worker to fit more)",
            wanted,
            fit,
            res.num_workers,
            res.cpus_per_worker,
            fit,
        )
    return min(wanted, fit)


def run_trial_fn(
    sampled: dict[str, Any],
    space_dict: dict[str, Any],
    storage_path: str,
    experiment: str,
    reuse_stage1: bool = True,
) -> None:
    """One Tune trial: rebuild the typed config, settle stage 1, fit one TorchTrainer."""
    space = parse_space(space_dict, source="<space>")
    cfg = space.trial_config(sampled)
    trial_id = tune.get_context().get_trial_id()
    experiment_path = f"{storage_path.rstrip('/')}/{experiment}"
    # Without reuse (for measuring what reuse saves) each trial keeps its stage 1 to itself.
    stage1_root = storage_path if reuse_stage1 else f"{experiment_path}/no-reuse/{trial_id}"
    location = stage1_location(cfg, stage1_root)
    claim = (
        stage1_claim(storage_path, location[0], location[1], holder=trial_id)
        if location is not None and reuse_stage1
        else contextlib.nullcontext(None)
    )
    with claim as stage1_mode:
        trainer, _ = build_trainer(
            cfg,
            storage_path=stage1_root,
            run_storage_path=experiment_path,
            # Stable per trial: a retried or restored trial resumes its own Train run.
            run_name=f"train-{trial_id}",
            callbacks=[TuneReportCallback()],
            run_test=False,  # the search chooses on validation only; test is for the winner
            stage1_mode=stage1_mode,
        )
        run_trainer(trainer)


def build_tuner(
    space: SearchSpace | str | os.PathLike[str],
    *,
    storage_path: str | None = None,
    name: str | None = None,
    num_samples: int | None = None,
    max_concurrent_trials: int | None = None,
    study_storage: str | None = "auto",
    overrides: Mapping[str, Any] | None = None,
    reuse_stage1: bool = True,
) -> tune.Tuner:
    """Build the ``Tuner`` for a search space. Ray must be initialised (it sizes concurrency).

    Args:
        space: a loaded :class:`SearchSpace` or the path of a space file.
        storage_path: results root (local path or URI; default ``~/dtlray_results``).
        name: experiment name (default ``<space name>-<time>``).
        num_samples: override the space's number of trials.
        max_concurrent_trials: override the derived concurrency.
        study_storage: an Optuna storage URL (e.g. ``sqlite:///study.db``) for the study;
            ``"auto"`` (default): ``<experiment>/optuna.db`` on local storage, so
            ``dtlray dashboard`` can show it live; None: in memory only.
        overrides: flat config values (``{"stage2.epochs": 2}``) applied to the fixed trial.
        reuse_stage1: share stage-1 results across trials (off only to measure what it saves).

    Returns:
        A ``ray.tune.Tuner``; ``fit()`` returns a normal ``ResultGrid``.
    """
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    updates: dict[str, Any] = {}
    if overrides:
        updates["trial"] = TrialConfig.from_flat(overrides, base=space.trial)
    if num_samples is not None:
        updates["num_samples"] = num_samples
    if max_concurrent_trials is not None:
        updates["max_concurrent_trials"] = max_concurrent_trials
    if updates:
        space = parse_space({**space.model_dump(mode="json"), **_dumped(updates)}, "<space>")
    storage_path = resolve_storage_path(storage_path)
    name = name or f"{space.name or 'search'}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        raise DtlrayError(
            f"experiment {path!r} already exists; continue it with --resume (restore_tuner), "
            "or choose another --name"
        )
    start_claims(storage_path)
    if study_storage == "auto":
        study_storage = _default_study_storage(path)
    _write_json(f"{path}/{SPACE_FILE}", space.model_dump(mode="json"))
    return tune.Tuner(
        _trainable(space, storage_path, name, reuse_stage1),
        tune_config=tune.TuneConfig(
            metric=space.objective.metric,
            mode=space.objective.mode,
            search_alg=build_searcher(space, study_name=name, study_storage=study_storage),
            scheduler=build_scheduler(space),
            num_samples=space.num_samples,
            # Without this Tune runs a non-default searcher one trial at a time.
            max_concurrent_trials=derive_max_concurrent_trials(space),
            # No actor reuse: a trial that ASHA stops is still blocked in trainer.fit(), so Tune
            # cannot reset its actor (it fails the next trial); a new actor costs ~1 s against
            # a trial's tens of seconds, and killing the old one is what ends its Train run.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )


def _default_study_storage(experiment_path: str) -> str | None:
    if "://" in experiment_path:
        log.info("study kept in memory: %s is not local (use --study-storage URL)", experiment_path)
        return None
    from dtlray.dashboard import study_url

    os.makedirs(experiment_path, exist_ok=True)
    return study_url(experiment_path)


@contextlib.contextmanager
def running_marker(experiment_path: str) -> Iterator[None]:
    """``<experiment>/.dtlray-running`` (pid, host) while a search runs, so ``dtlray report``
    can refuse a half-finished experiment. Local storage only."""
    if "://" in experiment_path:
        yield
        return
    marker = Path(experiment_path) / RUNNING_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def _trainable(space: SearchSpace, storage_path: str, name: str, reuse_stage1: bool = True) -> Any:
    return tune.with_resources(
        tune.with_parameters(
            run_trial_fn,
            space_dict=space.model_dump(mode="json"),
            storage_path=storage_path,
            experiment=name,
            reuse_stage1=reuse_stage1,
        ),
        {"CPU": TRIAL_DRIVER_CPU},
    )


def _dumped(updates: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.to_dict() if isinstance(v, TrialConfig) else v) for k, v in updates.items()}


def restore_tuner(space: SearchSpace, storage_path: str | None, name: str) -> tune.Tuner:
    """Continue an interrupted search: completed trials stay, unfinished ones resume.

    Raises:
        DtlrayError: nothing restorable under ``storage_path/name``.
    """
    storage_path = resolve_storage_path(storage_path)
    path = f"{storage_path.rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(path):
        raise DtlrayError(
            f"no restorable experiment at {path!r}; pass the --storage-path and --name of the "
            "interrupted run (its directory holds tuner.pkl)"
        )
    start_claims(storage_path)
    return tune.Tuner.restore(
        path, trainable=_trainable(space, storage_path, name), resume_errored=True
    )


def unfinished_trials(results: tune.ResultGrid, num_samples: int) -> int:
    """How many of the search's trials did not finish (an interrupted search has some)."""
    trials = results._experiment_analysis.trials  # statuses are not on the public Result
    done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
    return max(num_samples, len(trials)) - done


def stage1_reuse(results: tune.ResultGrid) -> dict[str, float]:
    """Stage-1 hits, misses and the compute the hits saved, from the trials' last reports."""
    reported = [r.metrics for r in results if r.metrics and "stage1/cache_hit" in r.metrics]
    hits = [m for m in reported if m["stage1/cache_hit"]]
    return {
        "hits": len(hits),
        "misses": len(reported) - len(hits),
        "seconds_saved": float(sum(m.get("stage1/compute_seconds", 0.0) for m in hits)),
    }


def summarize_best(results: tune.ResultGrid, space: SearchSpace, experiment_path: str) -> dict:
    """Pick the best trial on the objective, test it once, write ``best.json``; return it."""
    metric, mode = space.objective.metric, space.objective.mode
    try:
        best = results.get_best_result(metric=metric, mode=mode, scope="last")
    except RuntimeError as err:
        raise DtlrayError(
            f"no trial reported {metric!r} ({err}); see the trial errors above"
        ) from None
    sampled = {k: v for k, v in best.config.items() if k in space.search}
    cfg = space.trial_config(sampled)
    summary: dict[str, Any] = {
        "objective": {"metric": metric, "mode": mode, "value": best.metrics.get(metric)},
        "trial_id": best.metrics.get("trial_id"),
        "searched": sampled,
        "config": cfg.to_dict(),
        "val": {k: v for k, v in best.metrics.items() if k.endswith("val_acc")},
        "epochs": best.metrics.get("training_iteration"),
        "checkpoint_path": best.metrics.get("checkpoint_path"),
        "trials": len(results),
        "errors": sum(1 for r in results if r.error is not None),
        "stage1": stage1_reuse(results),
    }
    checkpoint_path = summary["checkpoint_path"]
    if checkpoint_path:
        from dtlray.evaluate import evaluate_checkpoint

        test = ray.get(ray.remote(num_cpus=1)(evaluate_checkpoint).remote(checkpoint_path))
        summary["test"] = test
    _write_json(f"{experiment_path.rstrip('/')}/{BEST_FILE}", summary)
    return summary


def _write_json(path: str, payload: Mapping[str, Any]) -> None:
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(root) as f:
            f.write(json.dumps(payload, indent=2, default=str).encode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
