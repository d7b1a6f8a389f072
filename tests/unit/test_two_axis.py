"""The two-axis searcher around dtlray's real Optuna searcher, called as Tune's controller calls
it (suggest, results, completion); and the space rules of ``scheduler: two_axis``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from dtlray.errors import DtlrayError
from dtlray.search_space import parse_space, to_optuna_distributions
from dtlray.searcher import TrialStateOptunaSearch, build_searcher, two_axis_search
from dtlray.two_axis import TwoAxisSearch


def two_axis_raw(**scheduler: Any) -> dict[str, Any]:
    raw = yaml.safe_load(Path("search_spaces/tiny.yaml").read_text())
    raw["trial"]["stage1"]["schedule"] = "wsd"
    raw["trial"]["stage2"]["epochs"] = 4
    raw["scheduler"] = {"type": "two_axis", "stage1_budgets": [2, 3, 4], "grace_period": 1,
                        "reduction_factor": 2, **scheduler}  # fmt: skip
    raw["num_samples"] = 12
    return raw


def two_budget_search(num_samples: int, name: str) -> Any:
    """The two-axis searcher over stage-1 budgets 2 and 3, for ``num_samples`` trials."""
    raw = two_axis_raw(stage1_budgets=[2, 3])
    raw["num_samples"] = num_samples
    return build_searcher(parse_space(raw), study_name=name)


def complete(search: Any, trial_id: str, config: dict[str, Any], value: float) -> None:
    epochs = config["stage2.epochs"]
    result = {"training_iteration": epochs, "epoch": epochs, "target/val_acc": value}
    search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, result=result)


def test_new_configs_start_small_and_the_best_fraction_goes_on() -> None:
    search = build_searcher(parse_space(two_axis_raw()), study_name="two-axis")
    assert isinstance(search, TwoAxisSearch)
    started: dict[str, dict[str, Any]] = {}
    # Four new configurations at the smallest budget, with the short finetune.
    for i in range(4):
        started[f"t{i}"] = search.suggest(f"t{i}")
        assert started[f"t{i}"]["stage1.epochs"] == 2 and started[f"t{i}"]["stage2.epochs"] == 1
    values = {"t0": 0.5, "t1": 0.9, "t2": 0.7, "t3": 0.6}
    for trial_id, value in values.items():
        complete(search, trial_id, started[trial_id], value)
    # Half of the 4 go on: the best (t1), then the second best (t2), at the next budget.
    promoted = [search.suggest("p0"), search.suggest("p1")]
    strip = lambda c: {k: v for k, v in c.items() if k not in ("stage1.epochs", "stage2.epochs")}  # noqa: E731
    assert [strip(c) for c in promoted] == [strip(started["t1"]), strip(started["t2"])]
    assert all(c["stage1.epochs"] == 3 and c["stage2.epochs"] == 1 for c in promoted)
    # No one else is in the top half: the next one is new, at the smallest budget.
    assert search.suggest("t4")["stage1.epochs"] == 2
    complete(search, "p0", promoted[0], 0.95)
    complete(search, "p1", promoted[1], 0.65)
    # Two results at budget 3: the better goes to the largest budget, with the full finetune.
    final = search.suggest("f0")
    assert strip(final) == strip(started["t1"])
    assert final["stage1.epochs"] == 4 and final["stage2.epochs"] == 4
    # Optuna learns from its own (new) configurations only, each a completed short finetune.
    study: optuna.Study = search.searcher._ot_study
    assert len(study.trials) == 5
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in done) == [0.5, 0.6, 0.7, 0.9]


def grid_search(space: Any, points: list[dict[str, Any]], *, grouped: bool) -> TwoAxisSearch:
    """The two-axis searcher of ``space``, its new configurations ``points`` in order (real
    Optuna, the points enqueued); not ``grouped``: without the configurations' stage-1 groups,
    ranking trials alone."""
    inner = TrialStateOptunaSearch(
        fixed_epochs=space.grace_period,
        space=to_optuna_distributions(space),
        metric="target/val_acc",
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        points_to_evaluate=points,
    )
    if grouped:
        return two_axis_search(space, inner)
    budgets, eta = space.scheduler.stage1_budgets, space.scheduler.reduction_factor
    return TwoAxisSearch(inner, budgets=budgets, reduction_factor=eta,
                         short_epochs=space.grace_period, full_epochs=space.max_epochs,
                         num_samples=space.num_samples)  # fmt: skip


@pytest.mark.parametrize("grouped", [True, False])
def test_promotions_go_to_the_best_stage1_configuration_first(grouped: bool) -> None:
    space = parse_space(two_axis_raw(stage1_budgets=[2, 3]))
    # Three stage-1 configurations (fusion depth 0, 1, 2), two finetune settings each.
    values = {(0, 0.01): 0.9, (0, 0.03): 0.5, (1, 0.01): 0.8, (1, 0.03): 0.7,
              (2, 0.01): 0.6, (2, 0.03): 0.4}  # fmt: skip
    points = [
        {"model.fusion_depth": depth, "stage2.lr": lr, "stage2.lr_mult_backbone": 0.5}
        for depth, lr in values
    ]
    search = grid_search(space, points, grouped=grouped)
    started = {f"t{i}": search.suggest(f"t{i}") for i in range(len(points))}
    for trial_id, config in started.items():
        assert config["stage1.epochs"] == 2
        value = values[config["model.fusion_depth"], config["stage2.lr"]]
        complete(search, trial_id, config, value)
    # Half of the 6 results earn a longer stage 1 (reduction factor 2).
    promoted = []
    while (config := search.suggest(f"p{len(promoted)}"))["stage1.epochs"] == 3:
        promoted.append((config["model.fusion_depth"], config["stage2.lr"]))
    if grouped:
        # The best half of the stage-1 configurations (one of 3: depth 0), and its trials:
        # both go on, sharing its longer stage 1. Depth 1's 0.8 and 0.7 are not promoted.
        assert promoted == [(0, 0.01), (0, 0.03)]
    else:  # ranking trials alone: three promotions, into two stage-1 configurations
        assert promoted == [(0, 0.01), (1, 0.01), (1, 0.03)]
    assert config["stage1.epochs"] == 2  # then a new configuration


def test_a_lead_that_passes_to_another_stage1_configuration_pays_no_second_stage1() -> None:
    space = parse_space(two_axis_raw(stage1_budgets=[2, 3]))
    values = {(0, 0.01): 0.80, (1, 0.01): 0.70, (1, 0.03): 0.81, (1, 0.05): 0.79}
    points = [
        {"model.fusion_depth": depth, "stage2.lr": lr, "stage2.lr_mult_backbone": 0.5}
        for depth, lr in values
    ]
    search = grid_search(space, points, grouped=True)

    def run_new(trial_id: str) -> None:
        config = search.suggest(trial_id)
        assert config["stage1.epochs"] == 2, f"{trial_id} is a promotion: {config}"
        value = values[config["model.fusion_depth"], config["stage2.lr"]]
        complete(search, trial_id, config, value)

    run_new("t0")
    run_new("t1")
    first = search.suggest("p0")  # 2 results: the best (depth 0, 0.80) earns a longer stage 1
    assert (first["stage1.epochs"], first["model.fusion_depth"]) == (3, 0)
    run_new("t2")
    run_new("t3")
    # Depth 1 now holds the best result (0.81) and 3 of 4; ranked afresh, it would be the one
    # configuration promoted from, and pay a longer stage 1 of its own. Depth 0's is paid for,
    # and its one trial is promoted already: nothing more to promote, a new configuration starts.
    after = search.suggest("p1")
    assert after["stage1.epochs"] == 2, after


def test_the_search_stops_at_num_samples() -> None:
    raw = two_axis_raw()
    raw["num_samples"] = 3
    search = build_searcher(parse_space(raw), study_name="two-axis-n")
    for i in range(3):
        config = search.suggest(f"t{i}")
        assert config is not None
        complete(search, f"t{i}", config, 0.5 + i / 10)
    assert search.suggest("t3") == search.FINISHED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scheduler": {"type": "two_axis"}}, "needs stage1_budgets"),
        ({"scheduler": {"type": "two_axis", "stage1_budgets": [3, 2]}}, "increasing"),
        ({"scheduler": {"type": "asha", "stage1_budgets": [2, 3]}}, "two_axis only"),
        ({"stage1": "cosine"}, "needs trial.stage1.schedule: wsd"),
        ({"search": {"stage1.epochs": {"choices": [2, 3]}}}, "two_axis sets it"),
    ],
)
def test_two_axis_space_rules(change: dict[str, Any], message: str) -> None:
    raw = two_axis_raw()
    if "scheduler" in change:
        raw["scheduler"] = change["scheduler"]
    if "stage1" in change:
        raw["trial"]["stage1"]["schedule"] = change["stage1"]
    if "search" in change:
        raw["search"].update(change["search"])
    with pytest.raises(DtlrayError, match=message):
        parse_space(raw)


def test_asking_ahead_leaves_the_trial_budget_its_promotions() -> None:
    # dtlray.stage1_order asks ahead while the first results are still out; the trial budget
    # (5) must still hold the promotion that the first results earn.
    search = two_budget_search(num_samples=5, name="two-axis-ahead")
    started = {f"t{i}": search.suggest(f"t{i}") for i in range(3)}
    assert all(c["stage1.epochs"] == 2 for c in started.values())
    assert search.suggest("t3") is None  # the rest is owed: wait for results
    complete(search, "t0", started["t0"], 0.4)
    complete(search, "t1", started["t1"], 0.8)
    promoted = search.suggest("p0")
    assert promoted["stage1.epochs"] == 3
    assert promoted["stage2.lr"] == started["t1"]["stage2.lr"]  # the better one goes on
    complete(search, "t2", started["t2"], 0.1)  # the promoted trial cannot earn any more
    last = search.suggest("t4")
    assert last["stage1.epochs"] == 2  # so the last trial goes to a new configuration
    assert search.suggest("t5") == search.FINISHED


def test_a_failed_or_diverged_trial_frees_the_share_it_would_have_earned() -> None:
    search = two_budget_search(num_samples=6, name="two-axis-failed")
    started = {f"t{i}": search.suggest(f"t{i}") for i in range(4)}
    assert search.suggest("t4") is None  # 2 left, both owed if all 4 get results
    search.on_trial_complete("t0", error=True)
    complete(search, "t1", started["t1"], float("nan"))
    assert search.suggest("t4")["stage1.epochs"] == 2  # now 1 is owed: room for a new one
    complete(search, "t2", started["t2"], 0.5)
    complete(search, "t3", started["t3"], 0.7)
    promoted = search.suggest("p0")
    assert promoted["stage1.epochs"] == 3
    assert promoted["stage2.lr"] == started["t3"]["stage2.lr"]
    assert search.suggest("t5") == search.FINISHED


def test_a_failed_trial_that_runs_again_is_live_again() -> None:
    # restore_tuner retries errored trials: one that failed and now reports is not lost.
    search = two_budget_search(num_samples=5, name="two-axis-retry")
    started = {f"t{i}": search.suggest(f"t{i}") for i in range(3)}
    search.on_trial_complete("t0", error=True)
    complete(search, "t1", started["t1"], 0.8)
    complete(search, "t2", started["t2"], 0.6)
    assert search.suggest("p0")["stage2.lr"] == started["t1"]["stage2.lr"]
    search.on_trial_result("t0", {"training_iteration": 1, "target/val_acc": 0.9})
    # t0 runs again and may earn the promotion the last trial is kept for: wait for it.
    assert search.suggest("t3") is None
    complete(search, "t0", started["t0"], 0.9)
    assert search.suggest("t3")["stage1.epochs"] == 3  # t0 goes on too (top 1 of 3 taken)


def test_a_search_saved_before_promotions_were_owed_resumes() -> None:
    search = two_budget_search(num_samples=5, name="two-axis-old")
    started = {f"t{i}": search.suggest(f"t{i}") for i in range(3)}
    complete(search, "t0", started["t0"], 0.5)
    complete(search, "t1", started["t1"], 0.7)
    search.on_trial_complete("t2", error=True)
    state = search.get_state()
    for key in ("_ended", "_lost"):  # what the previous version saved had neither
        del state[key]
    again = two_budget_search(num_samples=5, name="two-axis-old2")
    again.set_state(state)
    assert again._ended == {"t0", "t1", "t2"} and again._lost == {"t2"}
    assert again.suggest("p0")["stage1.epochs"] == 3
    assert again.suggest("t3")["stage1.epochs"] == 2  # nothing is live: no waiting forever


def test_tune_saves_and_restores_its_rungs(tmp_path: Path) -> None:
    from ray.tune.search import SearchGenerator

    search = build_searcher(parse_space(two_axis_raw()), study_name="two-axis-save")
    for i, value in enumerate((0.4, 0.8)):
        config = search.suggest(f"t{i}")
        complete(search, f"t{i}", config, value)
    SearchGenerator(search).save_to_dir(str(tmp_path), session_str="s")
    again = build_searcher(parse_space(two_axis_raw()), study_name="two-axis-save")
    SearchGenerator(again).restore_from_dir(str(tmp_path))
    assert again._rungs == search._rungs and again._started == 2
    promoted = again.suggest("p0")  # the restored rung promotes the better of the two
    assert promoted["stage1.epochs"] == 3


def test_finetune_asha_compares_full_finetunes_only() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from dtlray.search import build_trial_scheduler

    scheduler = build_trial_scheduler(parse_space(two_axis_raw()))
    scheduler.set_search_properties("target/val_acc", "max")
    short = [SimpleNamespace(trial_id=f"s{i}", config={"stage2.epochs": 1}) for i in range(4)]
    full = [SimpleNamespace(trial_id=f"f{i}", config={"stage2.epochs": 4}) for i in range(2)]
    for trial in short + full:
        scheduler.on_trial_add(None, trial)
    # Short finetunes score high at the first rung; they must not set its cutoff.
    for trial in short:
        result = {"training_iteration": 1, "target/val_acc": 0.99}
        assert scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE
        scheduler.on_trial_complete(None, trial, result)
    # The grace-period rung was the promotion's: a full finetune is not judged there again.
    for trial, value in zip(full, (0.6, 0.3), strict=True):
        result = {"training_iteration": 1, "target/val_acc": value}
        assert scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE
    # Among full finetunes ASHA still stops the worse one, at the next rung (1 x 2 epochs).
    first = {"training_iteration": 2, "target/val_acc": 0.6}
    assert scheduler.on_trial_result(None, full[0], first) == TrialScheduler.CONTINUE
    worse = {"training_iteration": 2, "target/val_acc": 0.3}
    assert scheduler.on_trial_result(None, full[1], worse) == TrialScheduler.STOP


def test_with_no_rung_after_the_grace_period_full_finetunes_run_to_the_end() -> None:
    from ray.tune.schedulers import FIFOScheduler

    from dtlray.search import build_trial_scheduler

    # Grace 3 x reduction 3 = 9 epochs: past the 4-epoch finetune, so nothing is left to cut.
    raw = two_axis_raw(grace_period=3, reduction_factor=3)
    assert type(build_trial_scheduler(parse_space(raw))) is FIFOScheduler
