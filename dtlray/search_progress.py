"""The console of ``dtlray tune``: a line per trial start and end, and a compact progress line.

Replaces Tune's status tables (``verbose=0``); ``dtlray tune --verbose`` brings those back. The
workers' own ``[dtlray] ... epoch`` lines carry the per-epoch progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ray import tune

from dtlray.metrics import DIVERGED_METRIC, DIVERGED_REASON, STAGE1_MODE

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from dtlray.search_space import SearchSpace

PROGRESS_EVERY_S = 60.0


class SearchProgress(tune.Callback):
    """Prints trial starts and ends and, after each end and every minute, where the search is.

    Everything it shows is read from Tune's trial list, so a resumed search counts the trials
    finished before the interruption too.

    Args:
        space: the space as started (its objective, trial budget and finetune epochs).
        out: where lines go (``print`` with flush by default).
    """

    def __init__(self, space: SearchSpace, out: Callable[[str], None] | None = None) -> None:
        self._metric = space.objective.metric
        self._mode = space.objective.mode
        self._num_samples = space.num_samples
        self._fixed_epochs = space.trial.stage2.epochs
        self._searched = list(space.search)
        self._out = out
        self._started = time.monotonic()
        self._last_progress = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the experiment for --resume: the clock restarts there.
        return {k: v for k, v in self.__dict__.items() if k != "_out"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _out=None)
        self._started = self._last_progress = time.monotonic()

    def _print(self, line: str) -> None:
        if self._out is not None:
            self._out(line)
        else:
            print(line, flush=True)

    # -- Tune hooks -------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        params = ", ".join(f"{k}={_fmt(trial.config.get(k))}" for k in self._searched)
        self._print(f"[search] trial {self._number(trials, trial)} started: {params}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self._print(f"[search] trial {self._number(trials, trial)} {self._ending(trial)}")
        self._progress(trials, just_ended=trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        where = f" (traceback: {trial.path}/error.txt)" if trial.path else ""
        self._print(f"[search] trial {self._number(trials, trial)} failed{where}")
        self._progress(trials, just_ended=trial, failed=True)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any):
        if time.monotonic() - self._last_progress >= PROGRESS_EVERY_S:
            self._progress(trials)

    # -- what to say ------------------------------------------------------------------------

    def _number(self, trials: Sequence[Trial], trial: Trial) -> str:
        index = next((i for i, t in enumerate(trials) if t is trial), len(trials) - 1)
        return f"{index + 1}/{self._num_samples} ({trial.trial_id})"

    def _planned_epochs(self, trial: Trial) -> int:
        return int(trial.config.get("stage2.epochs", self._fixed_epochs))

    def _ending(self, trial: Trial) -> str:
        last = trial.last_result or {}
        if last.get(DIVERGED_METRIC):
            return f"DIVERGED: {last.get(DIVERGED_REASON)}"
        value = _finite(last.get(self._metric))
        shown = f"{self._metric}={value:.4f}" if value is not None else f"no {self._metric}"
        epoch, planned = int(last.get("epoch", 0)), self._planned_epochs(trial)
        if epoch < planned:
            return f"stopped early at epoch {epoch}/{planned}: {shown}"
        return f"finished {planned} epochs: {shown}"

    def _progress(
        self, trials: Sequence[Trial], just_ended: Trial | None = None, failed: bool = False
    ) -> None:
        # Tune calls the end hooks before it changes the trial's status: ``just_ended`` (and
        # whether it ``failed``) says what the hook was told.
        self._last_progress = time.monotonic()

        def is_error(t: Trial) -> bool:
            return failed if t is just_ended else t.status == "ERROR"

        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is just_ended]
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not just_ended)
        pending = self._num_samples - len(ended) - running
        errors = sum(1 for t in ended if is_error(t))
        diverged = sum(1 for t in ended if (t.last_result or {}).get(DIVERGED_METRIC))
        stopped = sum(
            1
            for t in ended
            if not is_error(t)
            and not (t.last_result or {}).get(DIVERGED_METRIC)
            and int((t.last_result or {}).get("epoch", 0)) < self._planned_epochs(t)
        )
        counts = ((stopped, "stopped early"), (errors, "failed"), (diverged, "diverged"))
        notes = [f"{n} {what}" for n, what in counts if n]
        done = f"{len(ended)}/{self._num_samples} done" + (
            f" ({', '.join(notes)})" if notes else ""
        )
        parts = [done]
        parts.append(f"{running} running, {max(pending, 0)} pending")
        best = self._best(trials)
        if best is not None:
            parts.append(f"best {self._metric} {best[0]:.4f} ({best[1]})")
        modes = [(t.last_result or {}).get(STAGE1_MODE) for t in trials]
        if "computed" in modes or "reused" in modes:
            parts.append(
                f"stage 1: {modes.count('computed')} computed, {modes.count('reused')} reused"
            )
        parts.append(_elapsed(time.monotonic() - self._started))
        self._print("[search] " + "; ".join(parts))

    def _best(self, trials: Sequence[Trial]) -> tuple[float, str] | None:
        scored = [
            (value, t.trial_id)
            for t in trials
            if (value := _finite((t.last_result or {}).get(self._metric))) is not None
        ]
        if not scored:
            return None
        return max(scored) if self._mode == "max" else min(scored)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s elapsed"
