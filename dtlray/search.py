"""Tuner construction: searcher, scheduler, resources, storage, resume and the best trial.

A trial is :func:`dtlray.search_trial.run_trial_fn`: Tune samples the searched keys; the trial
rebuilds the typed config from the space as started plus that sample, claims or reuses the
stage-1 result, and runs the worker loop (in its own process for one worker, in a
``TorchTrainer`` for more). The searcher is :mod:`dtlray.searcher`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    AsyncHyperBandScheduler,
    FIFOScheduler,
    TrialScheduler,
)
from ray.tune.search import Searcher

from dtlray.config import TrialConfig
from dtlray.data import BUILTIN_DATASETS
from dtlray.errors import DtlrayError
from dtlray.experiment import ExperimentDir, default_name
from dtlray.logme_rung import LogMERung
from dtlray.metrics import DIVERGED_METRIC, STAGE1_MODE, STAGE1_REUSED_EPOCHS
from dtlray.search_progress import SearchProgress
from dtlray.search_space import (
    SearchSpace,
    Stage1Keys,
    check_searchable,
    load_space,
    parse_space,
)
from dtlray.search_trial import TRIAL_DRIVER_CPU, run_trial_fn, trial_resources
from dtlray.searcher import build_searcher
from dtlray.stage1_cache import has_stage1, stage1_dir
from dtlray.stage1_claims import start_claims
from dtlray.stage1_order import Stage1OrderedSearch
from dtlray.trial import runs_in_trial
from dtlray.trial_data import ensure_dataset

log = logging.getLogger(__name__)


def build_trial_scheduler(space: SearchSpace) -> TrialScheduler:
    """ASHA over finetune epochs (a first rung that lets slow starters live), or FIFO; behind
    the LogME rung when the space sets ``scheduler.logme_quantile``."""
    scheduler = _finetune_scheduler(space)
    if space.scheduler.logme_quantile is None:
        return scheduler
    return LogMERung(
        scheduler,
        quantile=space.scheduler.logme_quantile,
        min_configs=space.scheduler.logme_min_configs,
        # Within one search every trial reads the same source: no fingerprint is needed to
        # tell its stage 1s apart (and the replay benchmark has no prepared data to take it from).
        stage1_id=Stage1Keys(space, source_fingerprint=""),
    )


def _finetune_scheduler(space: SearchSpace) -> TrialScheduler:
    if space.scheduler.type == "fifo":
        return FIFOScheduler()
    if space.scheduler.type == "two_axis":  # its stage-1 axis is in its searcher
        # A promoted configuration passed the grace-period rung already, on its short-budget
        # finetune: its finetune is cut from the next rung on, not judged there twice.
        first = space.grace_period * space.scheduler.reduction_factor
        if first >= space.max_epochs:  # no rung left before the end
            return FIFOScheduler()
        return TopBudgetASHA(
            short_epochs=space.grace_period,
            time_attr="training_iteration",
            max_t=space.max_epochs,
            grace_period=first,
            reduction_factor=space.scheduler.reduction_factor,
        )
    return ASHAScheduler(
        time_attr="training_iteration",  # one Tune result per finetune epoch
        max_t=space.max_epochs,
        grace_period=space.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


class TopBudgetASHA(AsyncHyperBandScheduler):
    """Two-axis's finetune axis: ASHA among the trials that run the full finetune only, from
    the rung after the grace period on.

    A trial below the largest stage-1 budget runs a short finetune that ends at ASHA's first
    rung, and the two-axis searcher promotes on its value there: that is the finetune axis's
    first rung. Its value measures a shorter stage 1, so letting it set a later rung's cutoff
    would stop the promoted configurations it is compared with; and cutting a promoted
    configuration at the grace period again would judge it twice on the same rung, against
    whichever promoted trial got there first.
    """

    def __init__(self, *, short_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._short_epochs = short_epochs

    def _short(self, trial: Any) -> bool:
        return int(trial.config.get("stage2.epochs", 0)) <= self._short_epochs

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:  # noqa: D102
        if self._short(trial):
            return TrialScheduler.CONTINUE  # it ends at its last epoch on its own
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:  # noqa: D102
        if self._short(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


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


# Searched keys that can turn a one-worker trial into a TorchTrainer one (more workers, or a
# train split large enough to stream): see trial.runs_in_trial.
_WORKER_GROUP_KEYS = (
    "data.",
    "resources.",
    "stage2.init",
    "stage2.samples_per_class",
    "stage2.train_fraction",
)


def reuse_trial_actors(space: SearchSpace) -> bool:
    """Whether Tune keeps a finished trial's process for the next trial (``reuse_actors``).

    A fresh trial process pays ~3 s here before the trial starts (the process, then importing
    Ray Tune, torch and torchvision); a reused one pays none of it. Only trials that run the
    worker loop in their own process (:func:`~dtlray.trial.runs_in_trial`) can be reused: Tune
    stops a trial at one of its reports, where such a loop is waiting and ends at once, while a
    ``TorchTrainer`` trial is still inside ``fit()``. Tune then fails to reset the process in
    time and fails the next trial. So reuse only when no trial of the space can take that path.
    """
    if any(key.startswith(_WORKER_GROUP_KEYS) for key in space.search):
        return False
    return runs_in_trial(space.trial_config())


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
    searcher = build_searcher(space, study_name=experiment.name, study_storage=study_storage)
    if reuse_stage1:
        searcher = _stage1_ordered(searcher, space, experiment.storage_path)
    return tune.Tuner(
        _trainable(space, experiment, reuse_stage1),
        tune_config=tune.TuneConfig(
            metric=space.objective.metric,
            mode=space.objective.mode,
            search_alg=searcher,
            scheduler=build_trial_scheduler(space),
            num_samples=space.num_samples,
            # Without this Tune runs a non-default searcher one trial at a time.
            max_concurrent_trials=derive_max_concurrent_trials(space),
            reuse_actors=reuse_trial_actors(space),
        ),
        run_config=_run_config(space, experiment, verbose),
    )


def _stage1_ordered(searcher: Searcher, space: SearchSpace, storage_path: str) -> Searcher:
    """The searcher, reordered so no trial starts only to wait for a stage 1 being computed."""
    return Stage1OrderedSearch(
        searcher,
        stage1_key=Stage1Keys(space, _source_fingerprint(space)),
        is_stored=functools.partial(_stage1_stored, storage_path),
        num_samples=space.num_samples,
    )


def _source_fingerprint(space: SearchSpace) -> str:
    return ensure_dataset(space.trial.data.source, space.trial.data.root).fingerprint


def _stage1_stored(storage_path: str, key: str) -> bool:
    return has_stage1(stage1_dir(storage_path, key))


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
        functools.partial(trial_resources, space_dict),
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
    if not experiment.has_space():
        raise DtlrayError(
            f"no restorable experiment at {experiment.path!r}; pass the --storage-path and "
            "--name of the interrupted run (its directory holds space.json)"
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
        ``hits`` (reused), ``misses`` (computed), ``scratch`` (no stage 1), ``continued`` (the
        computed ones that continued a stored constant phase, the stage tree),
        ``epochs_continued`` (the stage-1 epochs those did not train) and ``seconds_saved``
        (the compute the reused ones and the continued epochs would have cost).
    """
    reported = [r.metrics for r in results if r.metrics and STAGE1_MODE in r.metrics]
    modes = [m[STAGE1_MODE] for m in reported]
    continued = [
        m for m in reported if m[STAGE1_MODE] == "computed" and m.get(STAGE1_REUSED_EPOCHS, 0) > 0
    ]
    saved = sum(m["stage1/compute_seconds"] for m in reported if m[STAGE1_MODE] == "reused")
    saved += sum(m["stage1/compute_seconds"] - m["stage1/seconds"] for m in continued)
    return {
        "hits": modes.count("reused"),
        "misses": modes.count("computed"),
        "scratch": modes.count("scratch"),
        "continued": len(continued),
        "epochs_continued": sum(m[STAGE1_REUSED_EPOCHS] for m in continued),
        "seconds_saved": float(saved),
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


def _driver_node_is_the_cluster() -> bool:
    """The Ray cluster is one node, this process's (an embedded local Ray, or ``ray start``
    on this machine alone), and not reached through Ray Client."""
    from ray.util.client import ray as client

    if client.is_connected():
        return False
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    return alive == [ray.get_runtime_context().get_node_id()]


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
    sampled = {k: v for k, v in best.config.items() if k in space.trial_keys}
    cfg = space.sampled_trial_config(sampled)
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

        if _driver_node_is_the_cluster():
            # Where a task would run anyway: here, without a worker process to start (one
            # that imports torch and dtlray first took 6-8 s of a 2-core machine).
            test, predictions = evaluate_checkpoint(checkpoint_path)
        else:  # on a worker node, which has the accelerators and the data the trials used
            test, predictions = ray.get(
                ray.remote(num_cpus=1)(evaluate_checkpoint).remote(checkpoint_path)
            )
        summary["test"] = test
        # Per image, for the report's paired comparison with the scratch baseline.
        experiment.write_predictions(summary["trial_id"], predictions)
    experiment.write_best(summary)
    return summary
