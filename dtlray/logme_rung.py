"""The zero-cost pre-rank: a rung on LogME before the finetune's own rungs (``logme_quantile``).

Every trial that starts from a stage 1 reports ``target/<task>/logme`` with its first finetune
result: LogME (:mod:`dtlray.logme`) of the stage-1 trunk's features on each target's train
split, computed before any finetuning. :class:`LogMERung` wraps the search's scheduler (ASHA
or FIFO; the space refuses it with two-axis, whose scores would pool stage-1 budgets) and stops
a trial at that first result when the mean LogME over its targets is below the ``quantile`` of
the stage-1 configurations seen so far: the rest of its finetune is skipped. It decides once at
least ``min_configs`` distinct stage-1 configurations have a score (a configuration counts
once, however many trials share its stage 1); before that, and for a trial with no score
(``stage2.init: scratch``, or streamed target splits), it passes the result on to the wrapped
scheduler unchanged.

It logs a line for every trial it stops (``dtlray tune`` shows it). Tune does not save a
scheduler with the experiment, so after ``--resume`` the scores start over.

Part of the search layer (:func:`dtlray.search.build_trial_scheduler` builds it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from ray.tune.schedulers import TrialScheduler

LOGME_PREFIX, LOGME_SUFFIX = "target/", "/logme"

log = logging.getLogger(__name__)


def mean_logme(result: dict[str, Any]) -> float | None:
    """The mean of a result's ``target/<task>/logme`` scores; None if it has none, or one is
    not finite (it cannot be ranked)."""
    scores = [
        float(v)
        for k, v in result.items()
        if k.startswith(LOGME_PREFIX) and k.endswith(LOGME_SUFFIX) and v is not None
    ]
    return float(np.mean(scores)) if scores and all(map(math.isfinite, scores)) else None


class LogMERung(TrialScheduler):
    """Stops, at its first result, a trial whose stage 1 ranks below ``quantile`` by LogME.

    Args:
        scheduler: the search's scheduler, which decides everything else.
        quantile: the share of stage-1 configurations (by LogME) whose trials stop early.
        min_configs: distinct stage-1 configurations scored before the rung stops any trial.
        stage1_id: the identity of a trial config's stage 1 (trials that share it, share a
            score).
    """

    def __init__(
        self,
        scheduler: TrialScheduler,
        *,
        quantile: float,
        min_configs: int,
        stage1_id: Callable[[dict[str, Any]], str | None],
    ) -> None:
        super().__init__()
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.scheduler = scheduler
        self._quantile = quantile
        self._min_configs = min_configs
        self._stage1_id = stage1_id
        self._scores: dict[str | None, float] = {}  # stage-1 identity -> its mean LogME
        self.stopped: list[str] = []  # trial ids the rung stopped, in order

    @property
    def metric(self) -> str | None:  # noqa: D102
        return self.scheduler.metric

    @property
    def supports_buffered_results(self) -> bool:  # noqa: D102
        return self.scheduler.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:  # noqa: D102
        return self.scheduler.set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:  # noqa: D102
        decision = self.scheduler.on_trial_result(tune_controller, trial, result)
        score = mean_logme(result) if result.get("training_iteration") == 1 else None
        if score is None:
            return decision
        # Scored whatever the wrapped scheduler decides: the quantile is over every stage 1.
        self._scores[self._stage1_id(trial.config)] = score
        if decision == TrialScheduler.STOP or len(self._scores) < self._min_configs:
            return decision
        cutoff = float(np.quantile(list(self._scores.values()), self._quantile))
        if score < cutoff:
            self.stopped.append(trial.trial_id)
            log.info(
                "[search] LogME rung stops trial %s at its first result: its stage 1's mean "
                "LogME %.4f is below %.4f, the %g quantile of %d stage-1 configurations",
                trial.trial_id,
                score,
                cutoff,
                self._quantile,
                len(self._scores),
            )
            return TrialScheduler.STOP
        return decision

    # -- the rest goes to the wrapped scheduler ------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:  # noqa: D102
        self.scheduler.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:  # noqa: D102
        self.scheduler.on_trial_error(tune_controller, trial)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:  # noqa: D102
        self.scheduler.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:  # noqa: D102
        self.scheduler.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:  # noqa: D102
        return self.scheduler.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:  # noqa: D102
        return f"{self.scheduler.debug_string()} + LogME rung (q={self._quantile})"
