"""The searcher: Optuna (TPE, seeded, or random) behind Ray Tune, recording true trial states.

Part of the search layer (:mod:`dtlray.search` builds the ``Tuner``).
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from dtlray.errors import DtlrayError
from dtlray.metrics import DIVERGED_METRIC
from dtlray.search_space import SearchSpace, Stage1Keys, to_optuna_distributions
from dtlray.two_axis import TwoAxisSearch


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
) -> Searcher:
    """Optuna TPE (seeded) or Optuna's random sampler, optionally with a persistent study; for
    ``scheduler: two_axis`` inside the two-axis searcher (:mod:`dtlray.two_axis`)."""
    # Optuna's INFO lines ("A new study created ...") repeat what dtlray tune prints.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.searcher.type == "optuna":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=space.searcher.seed, n_startup_trials=space.searcher.n_startup_trials
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=space.searcher.seed)
    storage = None
    if study_storage is not None:
        storage = _optuna_storage(study_storage)
    two_axis = space.scheduler.type == "two_axis"
    searcher = TrialStateOptunaSearch(
        # Two-axis: Optuna's own trials are the new ones, with their short finetune.
        fixed_epochs=space.grace_period if two_axis else space.trial.stage2.epochs,
        space=to_optuna_distributions(space),
        metric=space.objective.metric,
        mode=space.objective.mode,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
        # Start from the space's defaults: a known-reasonable point anchors the search.
        points_to_evaluate=[space.default_values()] if space.searcher.start_from_default else None,
    )
    return two_axis_search(space, searcher) if two_axis else searcher


def two_axis_search(space: SearchSpace, searcher: Searcher) -> TwoAxisSearch:
    """``searcher`` (which proposes the new configurations) inside the two-axis searcher of a
    ``scheduler: two_axis`` space."""
    assert space.scheduler.stage1_budgets is not None  # the space's validation saw to it
    return TwoAxisSearch(
        searcher,
        budgets=space.scheduler.stage1_budgets,
        reduction_factor=space.scheduler.reduction_factor,
        short_epochs=space.grace_period,
        full_epochs=space.max_epochs,
        num_samples=space.num_samples,
        # Within one search every trial reads the same source: no fingerprint is needed to
        # tell its stage 1s apart (nor, in the replay benchmark, a prepared dataset).
        stage1_group=Stage1Keys(space, source_fingerprint=""),
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
