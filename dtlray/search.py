"""Tuner construction: searcher, scheduler, resources, storage — the only module using Ray Tune.

A trial is the function :func:`run_trial_fn` (Train V2's pattern: a Tune function that builds and
fits a ``TorchTrainer``). Tune samples the searched keys; the trial rebuilds the typed config from
the space's fixed values plus that sample, claims or reuses the stage-1 result, and runs both
stages in one trainer whose per-epoch reports reach Tune through ``TuneReportCallback``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from dtlray.config import TrialConfig
from dtlray.data import BUILTIN_DATASETS
from dtlray.errors import DtlrayError
from dtlray.experiment import ExperimentDir, default_name
from dtlray.metrics import DIVERGED_METRIC, STAGE1_MODE
from dtlray.search_progress import SearchProgress
from dtlray.search_space import (
    SearchSpace,
    check_searchable,
    load_space,
    parse_space,
    to_optuna_distributions,
)
from dtlray.stage1_claims import stage1_claim, start_claims
from dtlray.train_loop import run_worker
from dtlray.trial import build_trainer, plan_trial, run_trainer, runs_in_trial, stage1_location
from dtlray.trial_data import ArrowSplit, ensure_dataset

log = logging.getLogger(__name__)

# The Tune trial itself only waits on its trainer; its workers hold the real resources.
TRIAL_DRIVER_CPU = 0.01


class TrialStateOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch`` that records each trial's true state in the Optuna study.

    Ray's searcher tells Optuna ``COMPLETE`` for every trial that reported the objective, so a
    trial ASHA stopped after 3 of 8 epochs looks finished with its 3-epoch value; TPE then takes
    that value as final. Here a trial that ran all its planned finetune epochs is ``COMPLETE``; one
    stopped before (ASHA) or that diverged is ``PRUNED`` with its per-epoch values as intermediate
    values — TPE ranks pruned trials below every completed one (by epochs reached, then value);
    one that failed is ``FAIL``.

    Args:
        fixed_epochs: the finetune epochs of a trial that does not search ``stage2.epochs``.
        kwargs: everything ``OptunaSearch`` takes.
    """

    def __init__(self, *, fixed_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fixed_epochs = fixed_epochs
        self._reported_steps: dict[str, set[int]] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:  # noqa: D102
        super().on_trial_result(trial_id, result)
        self._reported_steps.setdefault(trial_id, set()).add(int(result[TRAINING_ITERATION]))

    def on_trial_complete(  # noqa: D102
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if error or not result or ot_trial is None or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        planned = int(ot_trial.params.get("stage2.epochs", self._fixed_epochs))
        diverged = bool(result.get(DIVERGED_METRIC))
        if not diverged and int(result.get("epoch", 0)) >= planned:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        # Tune does not pass the result that made ASHA stop the trial to on_trial_result:
        # record it as the last intermediate value before pruning.
        step = result.get(TRAINING_ITERATION)
        value = result.get(self.metric)
        if step is not None and value is not None:
            if int(step) not in self._reported_steps.get(trial_id, set()):
                ot_trial.report(float(value), int(step))
        if diverged:
            ot_trial.set_user_attr("dtlray_status", "diverged")
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)
        self._reported_steps.pop(trial_id, None)


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
    return TrialStateOptunaSearch(
        fixed_epochs=space.trial.stage2.epochs,
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


def build_trial_scheduler(space: SearchSpace) -> TrialScheduler:
    """ASHA over finetune epochs (a first rung that lets slow starters live), or FIFO."""
    if space.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",  # one Tune result per finetune epoch
        max_t=space.max_epochs,
        grace_period=space.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


def rung_epochs(space: SearchSpace) -> tuple[int, ...]:
    """The finetune epochs at which ASHA decides on a trial (none for FIFO).

    The same milestones as Ray's ``ASHAScheduler``: ``grace_period * reduction_factor**k`` up to
    ``max_t``. A trial it stops ends with the report of such an epoch.
    """
    if space.scheduler.type != "asha":
        return ()
    rungs, milestone = [], float(space.grace_period)
    while milestone <= space.max_epochs:
        rungs.append(math.ceil(milestone))
        milestone *= space.scheduler.reduction_factor
    return tuple(rungs)


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


class TrialSession:
    """The worker loop's session when a one-worker trial runs it in the Tune trial itself.

    A one-worker ``TorchTrainer`` costs ~25 s of fixed start-up here (controller, worker group,
    dataset coordinators) against epochs of ~1 s; running the same loop in the trial's own
    process skips all of it. Reports go to Tune (one result per epoch, so ASHA acts on them),
    checkpoints are persisted by Tune into the trial directory, and a restarted trial
    (``tune.FailureConfig``) resumes from the last one.

    Args:
        datasets: the trial's splits by key, as Arrow tables in this process.
    """

    def __init__(self, datasets: Mapping[str, ArrowSplit]) -> None:
        self._datasets = dict(datasets)

    def dataset(self, key: str) -> ArrowSplit:  # noqa: D102
        return self._datasets[key]

    def checkpoint(self) -> tune.Checkpoint | None:  # noqa: D102
        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:  # noqa: D102
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)


def run_trial_fn(
    sampled: dict[str, Any],
    space_dict: dict[str, Any],
    storage_path: str,
    experiment: str,
    reuse_stage1: bool = True,
) -> None:
    """One Tune trial: rebuild the typed config, settle stage 1, run the worker loop — in this
    process for one worker, else in a ``TorchTrainer`` worker group (DDP)."""
    space = parse_space(space_dict, source="<space>")
    cfg = space.trial_config(sampled)
    trial_id = tune.get_context().get_trial_id()
    experiment_path = ExperimentDir.at(storage_path, experiment).path
    # Without reuse (for measuring what reuse saves) each trial keeps its stage 1 to itself.
    stage1_root = storage_path if reuse_stage1 else f"{experiment_path}/no-reuse/{trial_id}"
    location = stage1_location(cfg, stage1_root)
    claim = (
        stage1_claim(storage_path, location[0], location[1], holder=trial_id)
        if location is not None and reuse_stage1
        else contextlib.nullcontext(None)
    )
    rungs = rung_epochs(space)  # a stopped trial's last report must have its checkpoint
    with claim as stage1_mode:
        if runs_in_trial(cfg):
            trial = plan_trial(
                cfg,
                storage_path=stage1_root,
                run_test=False,
                stage1_mode=stage1_mode,
                in_process=True,
                checkpoint_epochs=rungs,
            )
            # The trial holds the worker's resources (see _trial_resources): a GPU if asked.
            device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
            run_worker(trial.worker_config, TrialSession(trial.datasets), device=device)
            return
        trainer, _ = build_trainer(
            cfg,
            storage_path=stage1_root,
            run_storage_path=experiment_path,
            # Stable per trial: a retried or restored trial resumes its own Train run.
            run_name=f"train-{trial_id}",
            callbacks=[TuneReportCallback()],
            run_test=False,  # the search chooses on validation only; test is for the winner
            stage1_mode=stage1_mode,
            checkpoint_epochs=rungs,
        )
        run_trainer(trainer)


def _trial_resources(space_dict: dict[str, Any], config: dict[str, Any]) -> Any:
    """A one-worker trial holds its worker's CPUs (and GPU); a multi-worker one only a sliver
    for its driver, its worker group reserving the rest."""
    cfg = parse_space(space_dict, source="<space>").trial_config(
        {k: v for k, v in config.items() if k in space_dict.get("search", {})}
    )
    if not runs_in_trial(cfg):
        return tune.PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPU}])
    use_gpu = cfg.resources.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    bundle = {"CPU": cfg.resources.cpus_per_worker}
    if use_gpu:
        bundle["GPU"] = 1
    return tune.PlacementGroupFactory([bundle])


def resolve_space(
    space: SearchSpace,
    *,
    overrides: Mapping[str, Any] | None = None,
    num_samples: int | None = None,
    max_concurrent_trials: int | None = None,
) -> SearchSpace:
    """The space as a search starts it: ``space`` with fixed values and budgets overridden.

    Raises:
        DtlrayError: an override names no config key or gives a bad value.
    """
    updates: dict[str, Any] = {}
    if overrides:
        updates["trial"] = TrialConfig.from_flat(overrides, base=space.trial).to_dict()
    if num_samples is not None:
        updates["num_samples"] = num_samples
    if max_concurrent_trials is not None:
        updates["max_concurrent_trials"] = max_concurrent_trials
    if not updates:
        return space
    return parse_space({**space.model_dump(mode="json"), **updates}, "<space>")


def check_datasets(space: SearchSpace) -> None:
    """Make sure every dataset the space can use is prepared, before any trial starts.

    Built-in datasets are prepared here on first use (once, not by racing trials).

    Raises:
        DtlrayError: a user dataset that was never prepared (the message says how).
    """
    # User datasets first: a missing one fails before minutes go into preparing built-ins.
    for name in sorted(space.dataset_names(), key=lambda n: (n in BUILTIN_DATASETS, n)):
        ensure_dataset(name, space.trial.data.root)


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
    verbose: bool = False,
) -> tune.Tuner:
    """Build the ``Tuner`` for a search space. Ray must be initialised (it sizes concurrency).

    The space as started (with every override) is stored as the experiment's ``space.json``;
    resume, the summary and the report read it back from there.

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
        verbose: Tune's own progress tables instead of dtlray's compact progress lines.

    Returns:
        A ``ray.tune.Tuner``; ``fit()`` returns a normal ``ResultGrid``.

    Raises:
        DtlrayError: nothing is searched, a dataset is not prepared, a bad override, or the
            experiment exists already.
    """
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    space = resolve_space(
        space,
        overrides=overrides,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
    )
    check_searchable(space)
    check_datasets(space)
    experiment = ExperimentDir.at(storage_path, name or default_name(space.name))
    if tune.Tuner.can_restore(experiment.path):
        raise DtlrayError(
            f"experiment {experiment.path!r} already exists; continue it with --resume "
            "(restore_tuner), or choose another --name"
        )
    start_claims(experiment.storage_path)
    if study_storage == "auto":
        study_storage = _default_study_storage(experiment)
    experiment.write_space(space)
    return tune.Tuner(
        _trainable(space, experiment, reuse_stage1),
        tune_config=tune.TuneConfig(
            metric=space.objective.metric,
            mode=space.objective.mode,
            search_alg=build_searcher(
                space, study_name=experiment.name, study_storage=study_storage
            ),
            scheduler=build_trial_scheduler(space),
            num_samples=space.num_samples,
            # Without this Tune runs a non-default searcher one trial at a time.
            max_concurrent_trials=derive_max_concurrent_trials(space),
            # No actor reuse: a trial that ASHA stops is still blocked in trainer.fit(), so Tune
            # cannot reset its actor (it fails the next trial); a new actor costs ~1 s against
            # a trial's tens of seconds, and killing the old one is what ends its Train run.
            reuse_actors=False,
        ),
        run_config=_run_config(space, experiment, verbose),
    )


def _run_config(space: SearchSpace, experiment: ExperimentDir, verbose: bool) -> tune.RunConfig:
    return tune.RunConfig(
        name=experiment.name,
        storage_path=experiment.storage_path,
        failure_config=tune.FailureConfig(max_failures=1),
        # One-worker trials report their checkpoints to Tune: keep the last two per trial.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        # dtlray's own lines (trial start/finish, a progress line) unless asked for Tune's.
        verbose=1 if verbose else 0,
        callbacks=[] if verbose else [SearchProgress(space)],
    )


def _default_study_storage(experiment: ExperimentDir) -> str | None:
    if not experiment.is_local:
        log.info("study kept in memory: %s is not local (use --study-storage URL)", experiment.path)
        return None
    os.makedirs(experiment.path, exist_ok=True)
    return experiment.study_url


def _trainable(space: SearchSpace, experiment: ExperimentDir, reuse_stage1: bool = True) -> Any:
    space_dict = space.model_dump(mode="json")
    return tune.with_resources(
        tune.with_parameters(
            run_trial_fn,
            space_dict=space_dict,
            storage_path=experiment.storage_path,
            experiment=experiment.name,
            reuse_stage1=reuse_stage1,
        ),
        functools.partial(_trial_resources, space_dict),
    )


def started_space(
    experiment: ExperimentDir,
    *,
    overrides: Mapping[str, Any] | None = None,
    num_samples: int | None = None,
    max_concurrent_trials: int | None = None,
) -> SearchSpace:
    """The space an interrupted search was started with, checked against what a resume asks.

    ``overrides``, ``num_samples`` and ``max_concurrent_trials`` may repeat the values the search
    was started with (the same command plus ``--resume``) but not change them. Needs no Ray.

    Raises:
        DtlrayError: nothing restorable there, or an option that changes the started search.
    """
    if not experiment.has_space() and not experiment.is_local:
        raise DtlrayError(f"no restorable dtlray experiment at {experiment.path!r}")
    if experiment.is_local and not os.path.isdir(experiment.path):
        raise DtlrayError(
            f"no restorable experiment at {experiment.path!r}; pass the --storage-path and "
            "--name of the interrupted run"
        )
    space = experiment.read_space()
    asked = resolve_space(
        space,
        overrides=overrides,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
    )
    if asked != space:
        raise DtlrayError(
            f"--resume continues {experiment.path} as it was started (its space.json); these "
            f"options change it: {', '.join(_changed_keys(space, asked))}. Drop them to "
            "resume, or start a new search under another --name"
        )
    return space


def restore_tuner(
    storage_path: str | None,
    name: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    num_samples: int | None = None,
    max_concurrent_trials: int | None = None,
) -> tune.Tuner:
    """Continue an interrupted search as it was started: completed trials stay, unfinished ones
    resume, and every trial runs the space stored in the experiment (with its overrides).

    Options may repeat the started values but not change them (see :func:`started_space`).

    Raises:
        DtlrayError: nothing restorable under ``storage_path/name``, or an option that
            differs from the started search.
    """
    experiment = ExperimentDir.at(storage_path, name)
    space = started_space(
        experiment,
        overrides=overrides,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
    )
    if not tune.Tuner.can_restore(experiment.path):
        raise DtlrayError(
            f"no restorable experiment at {experiment.path!r}; pass the --storage-path and "
            "--name of the interrupted run (its directory holds tuner.pkl)"
        )
    check_datasets(space)
    start_claims(experiment.storage_path)
    # The run config (console output included) is restored as the search was started.
    return tune.Tuner.restore(
        experiment.path, trainable=_trainable(space, experiment), resume_errored=True
    )


def _changed_keys(before: SearchSpace, after: SearchSpace) -> list[str]:
    old, new = _flat(before.model_dump(mode="json")), _flat(after.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _flat(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping) and key != "search":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unfinished_trials(results: tune.ResultGrid, num_samples: int) -> int:
    """How many of the search's trials did not finish (an interrupted search has some)."""
    trials = results._experiment_analysis.trials  # statuses are not on the public Result
    # A trial that Ctrl-C stopped is TERMINATED too, but its last result is not "done".
    done = sum(
        1
        for t in trials
        if t.status == "ERROR" or (t.status == "TERMINATED" and (t.last_result or {}).get("done"))
    )
    return max(num_samples, len(trials)) - done


def stage1_reuse(results: tune.ResultGrid) -> dict[str, float]:
    """How trials got stage 1 (``stage1/mode`` of their last reports) and what reuse saved.

    Returns:
        ``hits`` (reused), ``misses`` (computed), ``scratch`` (no stage 1) and
        ``seconds_saved`` (the compute the reused ones would have cost).
    """
    reported = [r.metrics for r in results if r.metrics and STAGE1_MODE in r.metrics]
    modes = [m[STAGE1_MODE] for m in reported]
    return {
        "hits": modes.count("reused"),
        "misses": modes.count("computed"),
        "scratch": modes.count("scratch"),
        "seconds_saved": float(
            sum(m["stage1/compute_seconds"] for m in reported if m[STAGE1_MODE] == "reused")
        ),
    }


def _checkpoint_uri(checkpoint: tune.Checkpoint | None) -> str | None:
    """A Tune checkpoint as a local path or a URI (its ``path`` lacks the scheme)."""
    if checkpoint is None:
        return None
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(checkpoint.filesystem.type_name, checkpoint.filesystem.type_name)
    return f"{scheme}://{checkpoint.path}"


def summarize_best(
    results: tune.ResultGrid, space: SearchSpace, experiment: ExperimentDir | str
) -> dict:
    """Pick the best trial on the objective, test it once, write ``best.json``; return it.

    Args:
        results: the finished search.
        space: the space as the search was started (``ExperimentDir.read_space()``).
        experiment: the experiment (or its path) to write ``best.json`` into.

    Raises:
        DtlrayError: no trial reported the objective (every trial failed or diverged).
    """
    if not isinstance(experiment, ExperimentDir):
        experiment = ExperimentDir(experiment)
    metric, mode = space.objective.metric, space.objective.mode
    diverged = [r for r in results if r.metrics and r.metrics.get(DIVERGED_METRIC)]
    try:
        best = results.get_best_result(metric=metric, mode=mode, scope="last")
    except RuntimeError as err:
        why = f"{len(diverged)} diverged; " if diverged else ""
        raise DtlrayError(
            f"no trial reported {metric!r} ({why}{err}); see the trial errors above"
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
        # Train-run trials report their checkpoint's path; in-trial ones hand it to Tune.
        "checkpoint_path": best.metrics.get("checkpoint_path") or _checkpoint_uri(best.checkpoint),
        "trials": len(results),
        "errors": sum(1 for r in results if r.error is not None),
        "diverged": len(diverged),
        "stage1": stage1_reuse(results),
    }
    checkpoint_path = summary["checkpoint_path"]
    if checkpoint_path:
        from dtlray.evaluate import evaluate_checkpoint

        test = ray.get(ray.remote(num_cpus=1)(evaluate_checkpoint).remote(checkpoint_path))
        summary["test"] = test
    experiment.write_best(summary)
    return summary
