"""The search as an in-memory Optuna study, and the fANOVA parameter importances over it.

The study is rebuilt from the trials' records, not read from the search's own study storage, so
the history and the importances work whatever storage the search used (or none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dtlray.experiment import SPACE_FILE
from dtlray.search_space import to_optuna_distributions

if TYPE_CHECKING:
    import optuna

    from dtlray.report.records import Experiment, TrialRecord
    from dtlray.search_space import SearchSpace


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
        if value is None and trial.status_text not in ("error", "diverged"):
            continue  # unfinished, nothing reported yet
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
