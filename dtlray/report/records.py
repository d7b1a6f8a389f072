"""A Tune experiment directory as records: one :class:`TrialRecord` per trial, one
:class:`Experiment` for the search.

Reads the plain files Tune and dtlray leave: each trial's ``params.json`` and ``result.json``
(one JSON line per finetune epoch), its ``error.txt``, Tune's latest ``experiment_state-*.json``
for the statuses, and dtlray's ``space.json`` and ``best.json`` (through
:class:`~dtlray.experiment.ExperimentDir`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from dtlray.errors import DtlrayError
from dtlray.experiment import BEST_FILE, SPACE_FILE, ExperimentDir, read_json
from dtlray.metrics import DIVERGED_METRIC, STAGE1_MODE, STAGE1_REUSED_EPOCHS
from dtlray.report.study import resolve_distributions

if TYPE_CHECKING:
    import optuna

    from dtlray.search_space import SearchSpace

log = logging.getLogger(__name__)

# What Tune writes in each trial directory.
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"

Stage1Kind = Literal["computed", "reused", "scratch"]
STAGE1_KINDS: tuple[str, ...] = get_args(Stage1Kind)


@dataclass(frozen=True)
class TrialRecord:
    """One Tune trial as its files describe it.

    Attributes:
        trial_id: Tune's trial id.
        order: Tune's trial index (the order trials were started), for sorting.
        params: the searched values Tune sampled (``params.json``).
        history: ``result.json`` rows, one per finetune epoch.
        status: Tune's status (``TERMINATED``, ``ERROR``, ``RUNNING``, ``PENDING``, ``PAUSED``),
            or ``UNKNOWN`` when ``experiment_state-*.json`` could not be read.
        error: the last line of ``error.txt`` (the exception), when the trial ever failed.
        planned_epochs: the finetune epochs the trial was configured for.
    """

    trial_id: str
    order: int
    params: dict[str, Any]
    history: tuple[dict[str, Any], ...]
    status: str
    error: str | None = None
    planned_epochs: int | None = None

    def value(self, metric: str) -> float | None:
        """The last reported ``metric`` (what Tune's ``get_best_result(scope="last")`` uses)."""
        for row in reversed(self.history):
            if metric in row:
                return finite(row[metric])
        return None

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """``(finetune epoch, metric)`` for every epoch that reported a finite ``metric``."""
        points = []
        for i, row in enumerate(self.history, start=1):
            value = finite(row.get(metric))
            if value is not None:
                points.append((int(row.get("training_iteration", i)), value))
        return points

    @property
    def epochs(self) -> int:
        """Finetune epochs run (ASHA stops poor trials before ``planned_epochs``)."""
        if not self.history:
            return 0
        return int(self.history[-1].get("training_iteration", len(self.history)))

    @property
    def stage1(self) -> Stage1Kind | None:
        """How this trial got stage 1 (``scratch``: it had none); None before any report.

        Read from ``stage1/mode``; experiments from before that metric are inferred from
        ``stage1/cache_hit`` and ``stage1/compute_seconds``.

        Raises:
            DtlrayError: ``stage1/mode`` holds a value this dtlray does not know.
        """
        last = self.history[-1] if self.history else {}
        if STAGE1_MODE in last:
            mode = last[STAGE1_MODE]
            if mode not in STAGE1_KINDS:
                raise DtlrayError(
                    f"trial {self.trial_id} reported {STAGE1_MODE} = {mode!r}; this dtlray "
                    f"knows {', '.join(STAGE1_KINDS)}. Report it with the dtlray version that "
                    "ran the search (upgrade this one)"
                )
            return mode
        if "stage1/cache_hit" not in last:
            return None
        if last["stage1/cache_hit"]:
            return "reused"
        return "computed" if (finite(last.get("stage1/compute_seconds")) or 0.0) > 0 else "scratch"

    @property
    def stage1_reused_epochs(self) -> float:
        """Stage-1 epochs a stored result covered (0 when the trial did not report it; a
        fraction when a stored constant phase ended mid-epoch)."""
        last = self.history[-1] if self.history else {}
        return float(finite(last.get(STAGE1_REUSED_EPOCHS)) or 0)

    @property
    def stage1_seconds(self) -> float:
        """What this trial itself spent on stage 1."""
        last = self.history[-1] if self.history else {}
        return finite(last.get("stage1/seconds")) or 0.0

    @property
    def useful_seconds(self) -> float:
        """Seconds that trained something: the stage 1 this trial computed itself and every
        finetune train pass (what a search's useful-work efficiency counts)."""
        own_stage1 = self.stage1_seconds if self.stage1 == "computed" else 0.0
        return own_stage1 + sum(
            finite(row.get("train/epoch_seconds")) or 0.0 for row in self.history
        )

    @property
    def stage1_compute_seconds(self) -> float:
        """What computing this trial's stage 1 cost (whoever computed it)."""
        last = self.history[-1] if self.history else {}
        return finite(last.get("stage1/compute_seconds")) or 0.0

    @property
    def diverged(self) -> bool:
        """The trial ended itself because its training loss went non-finite."""
        return bool(self.history and self.history[-1].get(DIVERGED_METRIC))

    @property
    def stopped_early(self) -> bool:
        """A finished trial that ran fewer finetune epochs than planned (ASHA stopped it)."""
        return (
            self.done
            and not self.diverged
            and self.planned_epochs is not None
            and self.epochs < self.planned_epochs
        )

    @property
    def status_text(self) -> str:
        """A short status for the results table."""
        if self.diverged:
            return "diverged"
        if self.status == "ERROR" or (self.status == "UNKNOWN" and self.error and not self.done):
            return "error"
        if self.status in ("TERMINATED", "UNKNOWN") and self.done:
            text = "stopped early" if self.stopped_early else "completed"
            return f"{text} (after a retry)" if self.error else text
        return self.status.lower() if self.status != "UNKNOWN" else "unfinished"

    @property
    def done(self) -> bool:
        """The trial's last report says it finished (or Tune marked it terminated)."""
        return self.status == "TERMINATED" or bool(self.history and self.history[-1].get("done"))


@dataclass(frozen=True)
class Experiment:
    """A finished search, as the report needs it."""

    path: Path
    metric: str
    mode: Literal["max", "min"]
    trials: list[TrialRecord]  # in Tune's start order
    best: dict[str, Any]  # best.json
    distributions: dict[str, optuna.distributions.BaseDistribution]
    space: SearchSpace | None = None
    notes: list[str] = field(default_factory=list)  # caveats shown in the report

    @property
    def name(self) -> str:
        """The experiment name (the directory's name)."""
        return self.path.name

    def ranked(self) -> list[TrialRecord]:
        """Trials best first on the objective; trials without a value last."""
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted(
            self.trials,
            key=lambda t: (t.value(self.metric) is None, sign * (t.value(self.metric) or 0.0)),
        )


def check_experiment_dir(path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` and refuse what is not a finished-or-stopped Tune experiment directory.

    Raises:
        DtlrayError: a URI, no such directory, not a Tune experiment, or a search still running
            (each message says what to pass instead or what to wait for).
    """
    text = os.fspath(path)
    if "://" in text:
        raise DtlrayError(
            f"{text!r}: the report is built from a local experiment directory; `dtlray report "
            f"{text}` mirrors its records locally first (dtlray.report.remote.fetch_records)"
        )
    exp = Path(text).expanduser().resolve()
    if not exp.exists():
        hint = _experiments_hint(exp.parent, "experiments there")
        raise DtlrayError(
            f"no such experiment directory {str(exp)!r}; pass <storage-path>/<name> as printed by "
            f"dtlray tune (default storage ~/dtlray_results){hint}"
        )
    if not exp.is_dir():
        raise DtlrayError(f"{str(exp)!r} is a file; pass the experiment directory")
    if not _is_tune_experiment(exp):
        hint = _experiments_hint(exp, "experiments inside it")
        raise DtlrayError(
            f"{str(exp)!r} is not a Ray Tune experiment directory (it has no tuner.pkl or "
            f"experiment_state-*.json); pass <storage-path>/<name> of a dtlray tune run{hint}"
        )
    ExperimentDir(str(exp)).check_not_running()
    return exp


def _is_tune_experiment(path: Path) -> bool:
    return (path / "tuner.pkl").is_file() or any(path.glob("experiment_state-*.json"))


def _experiments_hint(parent: Path, where: str) -> str:
    if not parent.is_dir():
        return ""
    found = sorted(p.name for p in parent.iterdir() if p.is_dir() and _is_tune_experiment(p))
    if not found:
        return ""
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return f" ({where}: {shown})"


def load_experiment(path: Path) -> Experiment:
    """Read the trials, the objective, the space and ``best.json`` of a checked experiment.

    Raises:
        DtlrayError: no trial reported the objective (empty, all failed, or stopped too early),
            or ``best.json`` is missing (interrupted or still running) or unreadable.
    """
    exp_dir = ExperimentDir(str(path))
    space, notes = _load_space(exp_dir)
    best = exp_dir.read_best()
    if space is not None:
        metric, mode = space.objective.metric, space.objective.mode
    elif best is not None:
        metric, mode = best["objective"]["metric"], best["objective"]["mode"]
    else:
        metric, mode = "target/val_acc", "max"
    fixed_epochs = _fixed_epochs(space, best)
    trials = load_trials(path, fixed_epochs)
    resume = f"dtlray tune SPACE.yaml --storage-path {path.parent} --name {path.name} --resume"
    if not any(t.value(metric) is not None for t in trials):
        failed = sum(1 for t in trials if t.status_text == "error")
        raise DtlrayError(
            f"experiment {str(path)!r} is empty: none of its {len(trials)} trial(s) reported "
            f"{metric!r} ({failed} failed; see run_*/{ERROR_FILE}). If it was interrupted before "
            f"a trial finished an epoch, continue it: {resume}"
        )
    if best is None:
        raise DtlrayError(
            f"{str(path)!r} has no {BEST_FILE}: the search was interrupted (or is still running "
            f"under another launcher). Finish it with: {resume}"
        )
    distributions, note = resolve_distributions(space, trials)
    if note:
        notes.append(note)
    return Experiment(
        path=path,
        metric=metric,
        mode=mode,
        trials=trials,
        best=best,
        distributions=distributions,
        space=space,
        notes=notes,
    )


def _load_space(exp_dir: ExperimentDir) -> tuple[SearchSpace | None, list[str]]:
    if not exp_dir.has_space():
        return None, [
            f"This experiment has no `{SPACE_FILE}`: the searched parameters and their ranges "
            "are inferred from the trials' `params.json` (bounds = the values tried)."
        ]
    return exp_dir.read_space(), []


def _fixed_epochs(space: SearchSpace | None, best: Mapping[str, Any] | None) -> int | None:
    if space is not None:
        return space.trial.stage2.epochs
    if best is not None:
        return int(best["config"]["stage2"]["epochs"])
    return None


def load_trials(path: Path, fixed_epochs: int | None = None) -> list[TrialRecord]:
    """Every trial directory of the experiment (those with ``params.json``), in start order.

    Args:
        path: the experiment directory.
        fixed_epochs: finetune epochs of a trial that does not search ``stage2.epochs``.
    """
    state = _tune_trial_states(path)
    trials = []
    for params_file in sorted(path.glob(f"*/{PARAMS_FILE}")):
        trial_dir = params_file.parent
        history = tuple(read_jsonl(trial_dir / RESULT_FILE))
        info = state.get(trial_dir.name, {})
        trial_id = str(
            info.get("trial_id")
            or (history[-1].get("trial_id") if history else None)
            or _id_from_dirname(trial_dir.name)
        )
        params = read_json(str(params_file))
        planned = params.get("stage2.epochs", fixed_epochs)
        trials.append(
            TrialRecord(
                trial_id=trial_id,
                order=_order_from_dirname(trial_dir.name, trial_id),
                params=params,
                history=history,
                status=str(info.get("status", "UNKNOWN")),
                error=_last_error_line(trial_dir / ERROR_FILE),
                planned_epochs=int(planned) if planned is not None else None,
            )
        )
    return sorted(trials, key=lambda t: (t.order, t.trial_id))


def _tune_trial_states(path: Path) -> dict[str, dict[str, Any]]:
    """``{trial dir name: {"trial_id", "status"}}`` from Tune's latest experiment state."""
    files = sorted(path.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    try:
        raw = json.loads(files[-1].read_text())
        states = {}
        for item in raw["trial_data"]:
            info = json.loads(item[0])
            states[str(info["relative_logdir"])] = {
                "trial_id": info["trial_id"],
                "status": info["status"],
            }
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        # A Ray version with another layout: statuses then come from the trial files alone.
        log.warning("dtlray report: cannot read trial statuses from %s (%s)", files[-1], err)
        return {}
    return states


_DIRNAME = re.compile(r"_([0-9a-f]{8}(?:_\d{5})?)_(\d+)_")


def _id_from_dirname(name: str) -> str:
    match = _DIRNAME.search(name)
    return match.group(1) if match else name


def _order_from_dirname(name: str, trial_id: str) -> int:
    # Tune names a trial directory <trainable>_<trial id>_<index>_<params>_<date>.
    match = re.search(rf"_{re.escape(trial_id)}_(\d+)_", name)
    return int(match.group(1)) if match else sys.maxsize


def _last_error_line(path: Path) -> str | None:
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else f"failed (empty {ERROR_FILE})"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file Tune may still be appending to (``result.json``).

    A missing file has no rows; a half-written last line is left out.

    Raises:
        DtlrayError: a line before the last is not JSON (names the file and line).
    """
    if not path.is_file():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # a line Tune was still writing
                break
            raise DtlrayError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool); else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
