"""One search trial, as Tune runs it: settle stage 1, then run the worker loop — in the trial's
own process for one worker, in a ``TorchTrainer`` worker group (DDP) for more.

Part of the search layer (:mod:`dtlray.search` builds the ``Tuner`` around it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dtlray.experiment import ExperimentDir
from dtlray.search_space import SearchSpace, parse_space
from dtlray.stage1_claims import CpuLoan, stage1_claim
from dtlray.train_loop import run_worker
from dtlray.trial import (
    build_trainer,
    plan_trial,
    resolve_use_gpu,
    run_trainer,
    runs_in_trial,
    stage1_location,
)
from dtlray.trial_data import ArrowSplit

# A multi-worker trial's own process only waits on its trainer; its workers hold the resources.
TRIAL_DRIVER_CPU = 0.01


def rung_epochs(space: SearchSpace) -> tuple[int, ...]:
    """The finetune epochs at which ASHA decides on a trial (none for FIFO).

    The same milestones as Ray's ``ASHAScheduler``: ``grace_period * reduction_factor**k`` up to
    ``max_t``. A trial it stops ends with the report of such an epoch.
    """
    if space.scheduler.type == "fifo":
        return ()
    rungs, milestone = [], float(space.grace_period)
    while milestone <= space.max_epochs:
        rungs.append(math.ceil(milestone))
        milestone *= space.scheduler.reduction_factor
    return tuple(rungs)


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
    in_trial = runs_in_trial(cfg)
    # While it waits for another trial's stage 1, an in-trial trial's CPUs are idle: it lends
    # them to the one computing it, and trains its own stage 1 on what others lend it.
    loan = CpuLoan() if in_trial else None
    claim = (
        stage1_claim(
            storage_path,
            location[0],
            location[1],
            holder=trial_id,
            cpus=cfg.resources.cpus_per_worker if in_trial else 0.0,
            loan=loan,
        )
        if location is not None and reuse_stage1
        else contextlib.nullcontext(None)
    )
    rungs = rung_epochs(space)  # a stopped trial's last report must have its checkpoint
    with claim as stage1_mode:
        if in_trial:
            trial = plan_trial(
                cfg,
                storage_path=stage1_root,
                run_test=False,
                stage1_mode=stage1_mode,
                in_process=True,
                checkpoint_epochs=rungs,
            )
            # The trial holds the worker's resources (see trial_resources): a GPU if asked.
            device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
            run_worker(trial.worker_config, TrialSession(trial.datasets), device=device, loan=loan)
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


def trial_resources(space_dict: dict[str, Any], config: dict[str, Any]) -> Any:
    """A one-worker trial holds its worker's CPUs (and GPU); a multi-worker one only a sliver
    for its driver, its worker group reserving the rest."""
    cfg = parse_space(space_dict, source="<space>").sampled_trial_config(config)
    if not runs_in_trial(cfg):
        return tune.PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPU}])
    bundle = {"CPU": cfg.resources.cpus_per_worker}
    if resolve_use_gpu(cfg):
        bundle["GPU"] = 1
    return tune.PlacementGroupFactory([bundle])
