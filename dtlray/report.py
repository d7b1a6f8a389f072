"""``dtlray report EXPERIMENT``: a finished search as Markdown + HTML, with the plots to look at.

The report reads the experiment directory's plain files — each trial's ``params.json`` and
``result.json`` (one JSON line per finetune epoch), Tune's ``experiment_state-*.json`` for the
trial statuses, dtlray's ``best.json`` and ``space.json`` — and writes ``<experiment>/report/``:

- ``report.md`` and ``report.html`` (the same content; the HTML links the PNGs beside it),
- ``history.png`` (optimization history), ``importance.png`` (fANOVA parameter importances),
  ``curves.png`` (learning curves of the top trials), ``stage1.png`` (stage-1 reuse).

History and importances come from an in-memory Optuna study rebuilt from the trials' final
objective values, so they work whatever study storage the search used. The transfer-gain table
compares the best configuration (finetuned from stage 1) with the same configuration trained
from scratch on the targets for the same number of finetune epochs; that scratch run is stored
under ``<experiment>/baseline/`` and ``--baseline`` trains it when it is missing.

Importing this module is cheap (no Ray, Optuna, torch or matplotlib): ``dtlray --help`` and
``dtlray check`` load it to register the subcommand.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dtlray.errors import DtlrayError

if TYPE_CHECKING:
    import optuna

    from dtlray.config import TrialConfig
    from dtlray.search_space import SearchSpace

from dtlray.experiment import (
    BASELINE_DIR,
    BEST_FILE,
    REPORT_DIR,
    SPACE_FILE,
    ExperimentDir,
    write_json,
)
from dtlray.metrics import DIVERGED_METRIC
from dtlray.search_space import to_optuna_distributions

log = logging.getLogger(__name__)

BASELINE_FILE = "result.json"
ERROR_FILE = "error.txt"  # Tune's per-trial error log
DEFAULT_TOP_K = 5
PLOTS = ("history.png", "importance.png", "curves.png", "stage1.png")

# -- reading an experiment -------------------------------------------------------------------------


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
                return _finite(row[metric])
        return None

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """``(finetune epoch, metric)`` for every epoch that reported a finite ``metric``."""
        points = []
        for i, row in enumerate(self.history, start=1):
            value = _finite(row.get(metric))
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
    def stage1(self) -> Literal["reused", "computed", "none"] | None:
        """How this trial got stage 1; ``none`` for scratch trials, None before any report."""
        last = self.history[-1] if self.history else {}
        if "stage1/cache_hit" not in last:
            return None
        if last["stage1/cache_hit"]:
            return "reused"
        return "computed" if (_finite(last.get("stage1/compute_seconds")) or 0.0) > 0 else "none"

    @property
    def stage1_compute_seconds(self) -> float:
        """What computing this trial's stage 1 cost (whoever computed it)."""
        last = self.history[-1] if self.history else {}
        return _finite(last.get("stage1/compute_seconds")) or 0.0

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
            f"{text!r}: dtlray report reads a local experiment directory; copy it down first "
            "(e.g. `aws s3 sync` / `gsutil rsync`) and pass the local copy"
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
    space, notes = _load_space(path)
    best_file = path / BEST_FILE
    best = _read_json(best_file) if best_file.is_file() else None
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


def _load_space(path: Path) -> tuple[SearchSpace | None, list[str]]:
    from dtlray.search_space import parse_space

    space_file = path / SPACE_FILE
    if not space_file.is_file():
        return None, [
            f"This experiment has no `{SPACE_FILE}`: the searched parameters and their ranges "
            "are inferred from the trials' `params.json` (bounds = the values tried)."
        ]
    return parse_space(_read_json(space_file), source=str(space_file)), []


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
    for params_file in sorted(path.glob("*/params.json")):
        trial_dir = params_file.parent
        history = tuple(_read_jsonl(trial_dir / "result.json"))
        info = state.get(trial_dir.name, {})
        trial_id = str(
            info.get("trial_id")
            or (history[-1].get("trial_id") if history else None)
            or _id_from_dirname(trial_dir.name)
        )
        params = _read_json(params_file)
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
    return lines[-1] if lines else "failed (empty error.txt)"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DtlrayError(f"cannot read {path}: {err}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# -- the Optuna study --------------------------------------------------------------------------


def resolve_distributions(
    space: SearchSpace | None, trials: Sequence[TrialRecord]
) -> tuple[dict[str, optuna.distributions.BaseDistribution], str | None]:
    """The searched parameters as Optuna distributions: the space's, else inferred from trials.

    Returns:
        The distributions and a note for the report when they had to be inferred although a
        space was given (a trial's value lies outside it, e.g. after the space file changed).
    """
    if space is not None:
        dists = to_optuna_distributions(space)
        if all(_fits(t.params, dists) for t in trials):
            return dists, None
        note = (
            f"Some trials' values lie outside `{SPACE_FILE}`'s distributions; the ranges are "
            "inferred from the trials' values instead."
        )
        return infer_distributions(trials), note
    return infer_distributions(trials), None


def _fits(params: Mapping[str, Any], dists: Mapping[str, Any]) -> bool:
    import optuna

    shared = {k: v for k, v in params.items() if k in dists}
    try:
        optuna.trial.create_trial(
            params=shared, distributions={k: dists[k] for k in shared}, value=0.0
        )
    except ValueError:
        return False
    return True


def infer_distributions(
    trials: Sequence[TrialRecord],
) -> dict[str, optuna.distributions.BaseDistribution]:
    """Distributions spanning the values the trials tried (for an experiment without a space).

    Ints give an int range, other numbers a float range (log-scaled when positive and spanning
    a factor of 10 or more), anything else a categorical of the values seen.
    """
    import optuna.distributions as od

    values: dict[str, list[Any]] = {}
    for trial in trials:
        for key, value in trial.params.items():
            values.setdefault(key, []).append(_param_value(value))
    out: dict[str, od.BaseDistribution] = {}
    for key, seen in values.items():
        numbers = [v for v in seen if not isinstance(v, bool) and isinstance(v, int | float)]
        if len(numbers) == len(seen) and all(isinstance(v, int) for v in numbers):
            out[key] = od.IntDistribution(min(numbers), max(numbers))
        elif len(numbers) == len(seen):
            low, high = float(min(numbers)), float(max(numbers))
            out[key] = od.FloatDistribution(low, high, log=low > 0 and high / low >= 10)
        else:
            choices = sorted(set(seen), key=repr)
            out[key] = od.CategoricalDistribution(choices)
    return out


def _param_value(value: Any) -> Any:
    # Optuna's categorical choices are None/bool/int/float/str; a list choice is shown as JSON.
    return (
        value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)
    )


def build_study(exp: Experiment) -> optuna.Study:
    """An in-memory Optuna study with one trial per Tune trial, in start order.

    States as ``dtlray tune`` records them in its mirrored study: a trial that ran all its
    finetune epochs is ``COMPLETE`` with its last value; one that ASHA stopped early, or that
    diverged, is ``PRUNED`` with its per-epoch values as intermediate values (so fANOVA, which
    reads completed trials only, does not take a 3-epoch value for a final one); one that
    failed without reporting is ``FAIL``; unfinished trials with no value are left out.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=exp.name, direction="maximize" if exp.mode == "max" else "minimize"
    )
    for trial in exp.trials:
        value = trial.value(exp.metric)
        if value is None and trial.status_text != "error":
            continue
        params = {k: _param_value(v) for k, v in trial.params.items() if k in exp.distributions}
        state = optuna.trial.TrialState
        if trial.diverged or trial.stopped_early:
            kind, value = state.PRUNED, None
        else:
            kind = state.COMPLETE if value is not None else state.FAIL
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: exp.distributions[k] for k in params},
                value=value,
                intermediate_values=dict(trial.curve(exp.metric)),
                state=kind,
                user_attrs={"tune_trial_id": trial.trial_id, "status": trial.status_text},
            )
        )
    return study


def param_importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """fANOVA importances (seeded), or ``({}, why not)`` where they would mean nothing.

    Optuna answers degenerate studies with uniform or zero-variance errors; those cases are
    caught here first and explained: fewer than two completed trials, no parameter that took
    two values, or every trial scoring the same.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, (
            f"Parameter importances need at least 2 completed trials; this search has "
            f"{len(complete)}. Run more trials (`--num-samples`)."
        )
    names = sorted({name for t in complete for name in t.params})
    if not names:
        return {}, "Parameter importances: this search has no searched parameters."
    varying = [n for n in names if len({repr(t.params.get(n)) for t in complete}) > 1]
    if not varying:
        return {}, (
            "Parameter importances: every completed trial used the same values, so no parameter "
            "can explain a difference."
        )
    if len({t.value for t in complete}) < 2:
        return {}, (
            "Parameter importances: every completed trial scored the same, so there is no "
            "variance to attribute."
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except RuntimeError as err:  # fANOVA: "zero total variance in all trees"
        return {}, f"Parameter importances: fANOVA found nothing to attribute ({err})."
    return {name: float(value) for name, value in importances.items()}, None


# -- stage-1 reuse and transfer gain ---------------------------------------------------------------


@dataclass(frozen=True)
class Stage1Summary:
    """How the search got its stage-1 results."""

    computed: int  # trials that pretrained
    reused: int  # trials that loaded a stored stage 1
    not_used: int  # scratch trials
    seconds_spent: float  # pretraining the computed ones cost
    seconds_saved: float  # pretraining the reused ones would have cost


def stage1_summary(trials: Sequence[TrialRecord]) -> Stage1Summary:
    """Counts and seconds from each trial's last report (as ``dtlray tune`` prints them)."""
    kinds = [(t.stage1, t.stage1_compute_seconds) for t in trials if t.stage1 is not None]
    return Stage1Summary(
        computed=sum(1 for kind, _ in kinds if kind == "computed"),
        reused=sum(1 for kind, _ in kinds if kind == "reused"),
        not_used=sum(1 for kind, _ in kinds if kind == "none"),
        seconds_spent=sum(s for kind, s in kinds if kind == "computed"),
        seconds_saved=sum(s for kind, s in kinds if kind == "reused"),
    )


@dataclass(frozen=True)
class GainRow:
    """One target's accuracy finetuned from stage 1 vs trained from scratch."""

    target: str
    finetuned: float
    scratch: float

    @property
    def gain_pp(self) -> float:
        """Finetuned minus scratch, in percentage points."""
        return (self.finetuned - self.scratch) * 100.0

    @property
    def negative(self) -> bool:
        """Negative transfer: stage 1 made this target worse than no pretraining."""
        return self.gain_pp < 0


def transfer_gain(
    targets: Sequence[str],
    finetuned: Mapping[str, float],
    scratch: Mapping[str, float],
    split: str = "test",
) -> list[GainRow]:
    """One row per target plus a final ``mean`` row (the mean over targets).

    Args:
        targets: the target dataset names.
        finetuned: metrics of the best config (``target/<task>/<split>_acc``).
        scratch: metrics of its scratch baseline, same keys.
        split: ``test`` or ``val``.

    Raises:
        DtlrayError: a target's accuracy is missing from either side.
    """
    rows = []
    for target in targets:
        key = f"target/{target}/{split}_acc"
        if key not in finetuned or key not in scratch:
            side = "best.json" if key not in finetuned else f"{BASELINE_DIR}/{BASELINE_FILE}"
            raise DtlrayError(f"{side} has no {key!r}; rerun dtlray report with --baseline")
        rows.append(GainRow(target, float(finetuned[key]), float(scratch[key])))
    mean = GainRow(
        "mean",
        sum(r.finetuned for r in rows) / len(rows),
        sum(r.scratch for r in rows) / len(rows),
    )
    return [*rows, mean]


def scratch_config(best: Mapping[str, Any]) -> TrialConfig:
    """The best trial's config trained from scratch for the finetune epochs it actually ran."""
    from dtlray.config import TrialConfig

    cfg = TrialConfig.from_dict(best["config"])
    epochs = int(best.get("epochs") or cfg.stage2.epochs)
    return TrialConfig.from_flat(
        {
            "stage2.init": "scratch",
            "stage2.epochs": epochs,
            "stage2.freeze_backbone_epochs": min(cfg.stage2.freeze_backbone_epochs, epochs),
        },
        base=cfg,
    )


def load_baseline(experiment: Path, expected: TrialConfig) -> tuple[dict[str, Any] | None, str]:
    """The stored scratch baseline when it was trained for ``expected``.

    Returns:
        ``(record, "")``, or ``(None, why)`` when there is none or it is for another config.
    """
    path = experiment / BASELINE_DIR / BASELINE_FILE
    if not path.is_file():
        return None, "not run yet"
    record = _read_json(path)
    if _comparable(record.get("config", {})) != _comparable(expected.to_dict()):
        return None, "the stored one was trained for another configuration (the best changed)"
    return record, ""


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    # Where the data lives does not change what the baseline measures.
    data = {k: v for k, v in config.get("data", {}).items() if k != "root"}
    return {**config, "data": data}


def run_baseline(
    experiment: Path, cfg: TrialConfig, trial_id: str, address: str | None = None
) -> dict[str, Any]:
    """Train the scratch baseline on Ray and store it as ``<experiment>/baseline/result.json``.

    Joins the Ray cluster at ``address`` (or the one already initialised, or starts an embedded
    local Ray, shut down afterwards). The Train run's name includes a hash of ``cfg``, so an
    interrupted baseline for the same config resumes from its last checkpoint.

    Raises:
        DtlrayError: a worker failed on bad input (e.g. a dataset that is no longer prepared).
    """
    import ray

    from dtlray.ray_session import init_ray
    from dtlray.trial import build_trainer, run_trainer

    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    started = not ray.is_initialized()
    init_ray(address)
    print(
        f"dtlray report: training the scratch baseline of trial {trial_id} "
        f"({cfg.model.backbone}, {cfg.stage2.epochs} finetune epoch(s) on "
        f"{', '.join(cfg.data.targets)})",
        flush=True,
    )
    try:
        trainer, _ = build_trainer(
            cfg,
            storage_path=str(experiment / BASELINE_DIR),
            run_name=f"scratch-{trial_id}-{digest}",
            run_test=True,
        )
        result = run_trainer(trainer)
    finally:
        if started:
            ray.shutdown()
    metrics = {k: v for k, v in (result.metrics or {}).items() if _finite(v) is not None}
    record = {
        "trial_id": trial_id,
        "config": cfg.to_dict(),
        "epochs": cfg.stage2.epochs,
        "metrics": metrics,
        "run_path": result.path,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(str(experiment / BASELINE_DIR / BASELINE_FILE), record)
    return record


# -- plots -------------------------------------------------------------------------------------


def _use_agg() -> None:
    import matplotlib

    # Only when no one chose a backend yet: a notebook that imported pyplot keeps its own.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def plot_history(study: optuna.Study, metric: str, path: Path) -> None:
    """Optuna's optimization history (objective per trial and best so far) as a PNG."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
        fig = ax.figure
        try:
            fig.set_size_inches(8, 4.5)
            direction = "max" if study.direction.name == "MAXIMIZE" else "min"
            ax.set_title(f"Optimization history: {metric} ({direction}) per trial")
            ax.set_xlabel("Trial (in the order Tune started them, from 0)")
            ax.set_ylabel(metric)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.margins(y=0.12)  # room for the best trial's label
            handles, labels = ax.get_legend_handles_labels()
            names = {metric: "trial's last value", "Best Value": "best so far"}
            ax.legend(handles, [names.get(label, label) for label in labels], loc="best")
            complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if complete:  # pruned trials have no final value to be the best
                pick = max if direction == "max" else min
                best = pick(complete, key=lambda t: t.value)
                ax.annotate(
                    f"best: {best.user_attrs.get('tune_trial_id', best.number)} ({best.value:.4f})",
                    (best.number, best.value),
                    textcoords="offset points",
                    xytext=(6, 6),
                    fontsize=9,
                )
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)


def plot_importances(importances: Mapping[str, float], path: Path) -> None:
    """Horizontal bars, most important on top."""
    from matplotlib.figure import Figure

    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(names)))
    ax = fig.subplots()
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set_xlim(0, max(1.0, max(values) * 1.15))
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_title("Parameter importances")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(exp: Experiment, top_k: int, path: Path) -> list[TrialRecord]:
    """The objective per finetune epoch: the top ``top_k`` trials in colour, the rest in grey.

    Returns:
        The trials drawn in colour, best first.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ranked = [t for t in exp.ranked() if t.curve(exp.metric)]
    top = ranked[:top_k]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, trial in enumerate(ranked[top_k:]):
        xs, ys = zip(*trial.curve(exp.metric), strict=True)
        ax.plot(xs, ys, color="0.75", lw=1, label="other trials" if i == 0 else None)
    for trial in top:
        xs, ys = zip(*trial.curve(exp.metric), strict=True)
        value = trial.value(exp.metric) or math.nan
        stopped = ", stopped early" if trial.status_text.startswith("stopped") else ""
        label = f"{trial.trial_id} ({value:.4f}{stopped})"
        ax.plot(xs, ys, marker="o", ms=4, lw=1.8, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("finetune epoch")
    ax.set_ylabel(exp.metric)
    ax.set_title(f"Learning curves: top {len(top)} trial(s) by final {exp.metric}")
    ax.grid(alpha=0.3)
    ax.legend(title="trial (final value)", fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return top


def plot_stage1(summary: Stage1Summary, path: Path) -> None:
    """Two bar panels: how many trials pretrained vs reused, and the seconds spent vs saved."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 3.6))
    left, right = fig.subplots(1, 2)
    colors = ["#dd8452", "#55a868"]
    bars = left.bar(["computed", "reused"], [summary.computed, summary.reused], color=colors)
    left.bar_label(bars, padding=2)
    left.set_ylabel("trials")
    left.set_title("Stage 1 per trial")
    left.set_ylim(0, max(summary.computed, summary.reused, 1) * 1.25)
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    seconds = [summary.seconds_spent, summary.seconds_saved]
    bars = right.bar(["spent pretraining", "saved by reuse"], seconds, color=colors)
    right.bar_label(bars, labels=[f"{s:.0f} s" for s in seconds], padding=2)
    right.set_ylabel("pretraining seconds")
    right.set_title("Stage-1 compute")
    right.set_ylim(0, max(*seconds, 1.0) * 1.25)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Stage-1 reuse across the search")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the document ----------------------------------------------------------------------------
# A report is a list of blocks rendered twice, to Markdown and to HTML, so the two never drift.
# Text may hold `code` and **bold** spans; everything else is escaped.


@dataclass(frozen=True)
class Heading:
    """A section title."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of text."""

    text: str


@dataclass(frozen=True)
class Note:
    """A caveat or an explanation in place of something missing (shown in italics)."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bullet list."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table; ``align`` holds ``l`` or ``r`` per column."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str = ""
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG beside the report."""

    src: str
    alt: str


@dataclass(frozen=True)
class Code:
    """A preformatted block (a config)."""

    text: str
    lang: str = ""


Block = Heading | Paragraph | Note | Bullets | Table | Image | Code


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The report as GitHub-flavoured Markdown."""
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Note):
            out += [f"*{block.text}*", ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            align = block.align or "l" * len(block.header)
            rule = ["---:" if a == "r" else "---" for a in align]
            out.append("| " + " | ".join(_md_cell(c) for c in block.header) + " |")
            out.append("| " + " | ".join(rule) + " |")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, Image):
            out += [f"![{block.alt}]({block.src})", ""]
        elif isinstance(block, Code):
            out += [f"```{block.lang}", block.text.rstrip("\n"), "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { background: #f6f8fa; padding: 0 0.2em; }
p.note { color: #555; }
""".strip()


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The report as one HTML page (images are the PNGs beside it)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_STYLE}\n</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Note):
            out.append(f'<p class="note"><em>{_inline_html(block.text)}</em></p>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_inline_html(item)}</li>" for item in block.items)
            out.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            align = block.align or "l" * len(block.header)
            out.append("<table>")
            if block.caption:
                out.append(f"<caption>{_inline_html(block.caption)}</caption>")
            cells = "".join(
                f'<th class="{a}">{_inline_html(c)}</th>'
                for a, c in zip(align, block.header, strict=True)
            )
            out.append(f"<thead><tr>{cells}</tr></thead><tbody>")
            for row in block.rows:
                cells = "".join(
                    f'<td class="{a}">{_inline_html(c)}</td>'
                    for a, c in zip(align, row, strict=True)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        elif isinstance(block, Image):
            src, alt = html.escape(block.src), html.escape(block.alt)
            out.append(f'<p><img src="{src}" alt="{alt}"></p>')
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


# -- the report ------------------------------------------------------------------------------


@dataclass
class _Baseline:
    record: dict[str, Any] | None
    missing_reason: str = ""


def build_report(
    experiment: str | os.PathLike[str],
    *,
    baseline: bool = False,
    address: str | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> Path:
    """Write ``<experiment>/report/`` (Markdown, HTML, PNGs); return that directory.

    Args:
        experiment: the experiment directory (``<storage-path>/<name>``).
        baseline: train the scratch baseline when it is missing (needs Ray).
        address: Ray cluster address for the baseline (default: embedded local Ray).
        top_k: how many trials get a coloured learning curve.

    Raises:
        DtlrayError: not a usable experiment (missing, not Tune's, running, empty, no
            ``best.json``), or the baseline run failed on bad input.
    """
    if top_k < 1:
        raise DtlrayError(f"--top-k must be at least 1, got {top_k}")
    exp = load_experiment(check_experiment_dir(experiment))
    expected = scratch_config(exp.best)
    record, why = load_baseline(exp.path, expected)
    if record is None and baseline:
        trial_id = str(exp.best.get("trial_id"))
        record, why = run_baseline(exp.path, expected, trial_id, address), ""
    base = _Baseline(record, why)
    out = exp.path / REPORT_DIR
    _write_atomically(out, lambda tmp: _write_report(exp, base, top_k, tmp))
    return out


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a fresh hidden directory beside ``target``, then swap it in whole."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is for sharing
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_report(exp: Experiment, base: _Baseline, top_k: int, out: Path) -> None:
    _use_agg()
    study = build_study(exp)
    blocks: list[Block] = []
    blocks += _summary_section(exp)
    blocks += _best_section(exp)
    blocks += _gain_section(exp, base)
    blocks += _results_section(exp)

    blocks.append(Heading("Optimization history"))
    plot_history(study, exp.metric, out / "history.png")
    blocks.append(Image("history.png", f"{exp.metric} per trial and the best so far"))

    blocks.append(Heading("Parameter importances"))
    importances, why_not = param_importances(study)
    if importances:
        plot_importances(importances, out / "importance.png")
        blocks.append(Image("importance.png", "fANOVA parameter importances"))
        blocks.append(
            Table(
                header=("parameter", "importance"),
                rows=tuple((f"`{k}`", f"{v:.3f}") for k, v in importances.items()),
                align="lr",
                caption=f"fANOVA (Optuna, seed 0) over {len(study.trials)} trial(s) on "
                f"{exp.metric}; with few trials treat these as rough.",
            )
        )
    else:
        blocks.append(Note(why_not or ""))

    blocks.append(Heading("Learning curves"))
    top = plot_curves(exp, top_k, out / "curves.png")
    blocks.append(Image("curves.png", f"{exp.metric} per finetune epoch, top trials"))
    blocks.append(
        Paragraph(
            f"{exp.metric} after each finetune epoch for the {len(top)} best trial(s) "
            "(others in grey); a curve that ends early is a trial ASHA stopped."
        )
    )

    blocks += _stage1_section(exp, out)
    title = f"dtlray report: {exp.name}"
    (out / "report.html").write_text(render_html(title, blocks))
    (out / "report.md").write_text(render_markdown(title, blocks))


def _summary_section(exp: Experiment) -> list[Block]:
    best = exp.best
    statuses = [t.status_text for t in exp.trials]
    counts = ", ".join(
        f"{statuses.count(s)} {s}" for s in sorted(set(statuses), key=statuses.index)
    )
    cfg = best["config"]
    items = [
        f"Experiment: `{exp.path}`",
        f"Pipeline: {cfg['data']['source']} → {', '.join(cfg['data']['targets'])}",
        f"Trials: {len(exp.trials)} ({counts})",
        f"Objective: `{exp.metric}` ({exp.mode}), the last value each trial reported",
        f"Best trial: **{best.get('trial_id')}** with {exp.metric} = "
        f"{_acc(_finite(best['objective']['value']))}",
    ]
    test = best.get("test", {}).get("target/test_acc")
    if test is not None:
        items.append(f"Its test accuracy (mean over targets): {_acc(test)}")
    items.append(f"Generated: {time.strftime('%Y-%m-%d %H:%M:%S')}")
    blocks: list[Block] = [Heading("Summary"), Bullets(tuple(items))]
    blocks += [Note(f"Note: {note}") for note in exp.notes]
    return blocks


def _best_section(exp: Experiment) -> list[Block]:
    best = exp.best
    searched = best.get("searched", {})
    blocks: list[Block] = [
        Heading("Best configuration"),
        Paragraph(
            f"Trial **{best.get('trial_id')}**, {best.get('epochs')} finetune epoch(s). "
            "Test accuracy is computed for this trial only; the search chose on validation."
        ),
    ]
    if searched:
        blocks.append(
            Table(
                header=("searched parameter", "value"),
                rows=tuple((f"`{k}`", _fmt(v)) for k, v in searched.items()),
            )
        )
    val, test = best.get("val", {}), best.get("test", {})
    targets = list(best["config"]["data"]["targets"])
    rows = [
        (
            t,
            _acc(_finite(val.get(f"target/{t}/val_acc"))),
            _acc(_finite(test.get(f"target/{t}/test_acc"))),
        )
        for t in targets
    ]
    rows.append(
        (
            "**mean**",
            _acc(_finite(val.get("target/val_acc"))),
            _acc(_finite(test.get("target/test_acc"))),
        )
    )
    blocks.append(
        Table(
            header=("target", "val acc", "test acc"),
            rows=tuple(rows),
            align="lrr",
            caption="Accuracy per target of the best trial",
        )
    )
    source = _finite(val.get("source/val_acc"))
    if source is not None:
        blocks.append(
            Paragraph(
                f"Stage 1 reached {_acc(source)} validation accuracy on the source "
                f"({best['config']['data']['source']})."
            )
        )
    import yaml

    blocks.append(Paragraph("The full configuration (`config` in `best.json`):"))
    blocks.append(Code(yaml.safe_dump(best["config"], sort_keys=False), "yaml"))
    return blocks


def _gain_section(exp: Experiment, base: _Baseline) -> list[Block]:
    best = exp.best
    targets = list(best["config"]["data"]["targets"])
    epochs = best.get("epochs")
    blocks: list[Block] = [Heading("Transfer gain")]
    if base.record is None:
        blocks.append(
            Paragraph(
                f"No scratch baseline ({base.missing_reason}). Train it — the best configuration "
                f"with `stage2.init: scratch` for {epochs} finetune epoch(s) — and rebuild this "
                f"report with: `dtlray report {exp.path} --baseline`"
            )
        )
        return blocks
    finetuned: Mapping[str, float] = best.get("test", {})
    split = "test"
    if not all(f"target/{t}/test_acc" in finetuned for t in targets):
        finetuned, split = best.get("val", {}), "val"
    rows = transfer_gain(targets, finetuned, base.record["metrics"], split=split)
    table_rows = []
    for row in rows:
        name = "**mean**" if row is rows[-1] else row.target
        flag = "**yes**" if row.negative else "no"
        table_rows.append(
            (name, _acc(row.finetuned), _acc(row.scratch), f"{row.gain_pp:+.1f}", flag)
        )
    blocks.append(
        Table(
            header=(
                "target",
                f"finetuned from stage 1 ({split} acc)",
                f"from scratch ({split} acc)",
                "gain (pp)",
                "negative transfer",
            ),
            rows=tuple(table_rows),
            align="lrrrl",
            caption=f"Best configuration finetuned from stage 1 vs the same configuration "
            f"trained from scratch on the targets, at matched epochs ({epochs} finetune "
            f"epoch(s) each). Gain in percentage points; negative transfer: gain < 0.",
        )
    )
    if split == "val":
        blocks.append(Note("best.json has no test accuracy; validation accuracy is compared."))
    negative = [r.target for r in rows[:-1] if r.negative]
    if negative:
        blocks.append(
            Paragraph(
                f"Negative transfer on {', '.join(negative)}: pretraining on "
                f"{best['config']['data']['source']} hurt there."
            )
        )
    return blocks


def _results_section(exp: Experiment) -> list[Block]:
    names = list(exp.distributions) or sorted({k for t in exp.trials for k in t.params})
    number = {t.trial_id: i for i, t in enumerate(exp.trials)}
    best_id = exp.best.get("trial_id")
    rows = []
    for trial in exp.ranked():
        trial_id = f"**{trial.trial_id}**" if trial.trial_id == best_id else trial.trial_id
        epochs = f"{trial.epochs}/{trial.planned_epochs}" if trial.planned_epochs else "—"
        rows.append(
            (
                str(number[trial.trial_id]),
                trial_id,
                *(_fmt(trial.params.get(n, "—")) for n in names),
                _acc(trial.value(exp.metric)),
                epochs,
                trial.stage1 or "—",
                trial.status_text,
            )
        )
    blocks: list[Block] = [
        Heading("All trials"),
        Table(
            header=(
                "#",
                "trial",
                *(f"`{n}`" for n in names),
                exp.metric,
                "epochs",
                "stage 1",
                "status",
            ),
            rows=tuple(rows),
            align="rl" + "l" * len(names) + "rrll",
            caption=f"Best first by {exp.metric} (last reported value). #: start order, as "
            "in the history plot. Epochs: run/planned — ASHA stops poor trials early.",
        ),
    ]
    errored = [t for t in exp.trials if t.error]
    if errored:
        blocks.append(
            Table(
                header=("trial", "status", "error (last line of error.txt)"),
                rows=tuple((t.trial_id, t.status_text, t.error or "") for t in errored),
                caption="Trials that failed (full tracebacks in run_*/error.txt)",
            )
        )
    return blocks


def _stage1_section(exp: Experiment, out: Path) -> list[Block]:
    summary = stage1_summary(exp.trials)
    blocks: list[Block] = [Heading("Stage-1 reuse")]
    if summary.computed + summary.reused == 0:
        blocks.append(Note("No trial used stage 1 (all trained from scratch)."))
        return blocks
    plot_stage1(summary, out / "stage1.png")
    blocks.append(Image("stage1.png", "stage-1 runs computed vs reused, seconds spent vs saved"))
    text = (
        f"{summary.computed} trial(s) pretrained stage 1 ({summary.seconds_spent:.0f} s), "
        f"{summary.reused} reused a stored stage 1, saving {summary.seconds_saved:.0f} s of "
        "pretraining"
    )
    if summary.not_used:
        text += f"; {summary.not_used} trained from scratch"
    blocks.append(Paragraph(text + "."))
    return blocks


# -- CLI ---------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dtlray report`` on the top-level subparsers.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``report`` parser (its ``handler`` is set).
    """
    p = subparsers.add_parser(
        "report",
        help="results table, best config, plots and transfer gain of a search",
        description="Write <EXPERIMENT>/report/ (report.md, report.html and PNG plots): all "
        "trials, the best configuration with its val and test accuracy per target, "
        "optimization history, parameter importances, learning curves, stage-1 reuse, and the "
        "transfer gain over training the best configuration from scratch.",
    )
    p.add_argument(
        "experiment", metavar="EXPERIMENT", help="the experiment directory (<storage-path>/<name>)"
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="train the from-scratch baseline when it is missing (needs Ray)",
    )
    p.add_argument("--address", help="Ray cluster address for --baseline (default: local Ray)")
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"trials drawn in the learning-curve plot (default {DEFAULT_TOP_K})",
    )
    p.set_defaults(handler=_cmd_report)
    return p


def _cmd_report(args: argparse.Namespace) -> int:
    out = build_report(
        args.experiment, baseline=args.baseline, address=args.address, top_k=args.top_k
    )
    print(f"report: {out / 'report.html'}\n        {out / 'report.md'}")
    return 0


def main_args(argv: Sequence[str]) -> int:
    """Run ``dtlray report`` with ``argv`` (the arguments after ``report``).

    A :class:`DtlrayError` propagates (``dtlray.cli.main`` prints it and exits 2).
    """
    parser = argparse.ArgumentParser(prog="dtlray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *argv])
    return int(args.handler(args) or 0)
