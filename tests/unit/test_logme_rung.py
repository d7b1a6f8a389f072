"""The LogME rung around Ray's real ASHA and FIFO schedulers, called as Tune's controller calls
them; and the space rules of ``scheduler.logme_quantile``."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from ray.tune.schedulers import TrialScheduler

from dtlray.errors import DtlrayError
from dtlray.logme_rung import LogMERung, mean_logme
from dtlray.search import build_trial_scheduler
from dtlray.search_space import parse_space

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def rung_raw(**scheduler: Any) -> dict[str, Any]:
    raw = yaml.safe_load(Path("search_spaces/tiny.yaml").read_text())
    raw["scheduler"] = {"type": "fifo", "logme_quantile": 0.5, "logme_min_configs": 3, **scheduler}
    return raw


def trial(trial_id: str, depth: int, lr: float = 0.01) -> SimpleNamespace:
    return SimpleNamespace(
        trial_id=trial_id, config={"model.fusion_depth": depth, "stage2.lr": lr}
    )  # Tune's Trial, as a scheduler reads it


def first_result(logme: tuple[float, float] | None, val: float = 0.5) -> dict[str, Any]:
    result: dict[str, Any] = {"training_iteration": 1, "target/val_acc": val}
    if logme is not None:
        result["target/digits/logme"], result["target/faces/logme"] = logme
    return result


def report(scheduler: TrialScheduler, t: SimpleNamespace, result: dict[str, Any]) -> str:
    return scheduler.on_trial_result(None, t, result)


def test_below_the_quantile_of_the_stage1_configurations_stops_at_the_first_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = build_trial_scheduler(parse_space(rung_raw()))
    assert isinstance(scheduler, LogMERung)
    scheduler.set_search_properties("target/val_acc", "max")
    trials = [trial(f"t{i}", depth) for i, depth in enumerate((0, 1, 1, 2, 0, 1))]
    for t in trials:
        scheduler.on_trial_add(None, t)
    # Fewer than 3 stage-1 configurations scored: nothing stops, whatever the score.
    assert report(scheduler, trials[0], first_result((-1.0, -1.2))) == CONTINUE  # depth 0
    assert report(scheduler, trials[1], first_result((0.5, 0.7))) == CONTINUE  # depth 1
    # A second trial of depth 1 shares its stage 1: still 2 configurations.
    assert report(scheduler, trials[2], first_result((0.5, 0.7))) == CONTINUE
    # The third configuration is scored: median of (-1.1, 0.6, 0.2) is 0.2; 0.2 is not below.
    assert report(scheduler, trials[3], first_result((0.1, 0.3))) == CONTINUE  # depth 2
    # depth 0 (-1.1) is below the median now: its next trial stops at its first result.
    with caplog.at_level(logging.INFO, logger="dtlray.logme_rung"):
        assert report(scheduler, trials[4], first_result((-1.0, -1.2), val=0.9)) == STOP
    assert "LogME rung stops trial t4" in caplog.text  # the user sees why it stopped
    assert "-1.1000 is below 0.2000, the 0.5 quantile of 3 stage-1 configurations" in caplog.text
    assert report(scheduler, trials[5], first_result((0.5, 0.7))) == CONTINUE
    assert scheduler.stopped == ["t4"]
    # Only the first result is ranked: later ones go to FIFO alone.
    assert report(scheduler, trials[0], {"training_iteration": 2, "target/val_acc": 0.1}) == (
        CONTINUE
    )


def test_no_score_passes_and_the_wrapped_asha_still_decides() -> None:
    scheduler = build_trial_scheduler(
        parse_space(rung_raw(type="asha", grace_period=1, logme_min_configs=2))
    )
    scheduler.set_search_properties("target/val_acc", "max")
    trials = [trial(f"t{i}", i % 3) for i in range(4)]
    for t in trials:
        scheduler.on_trial_add(None, t)
    assert report(scheduler, trials[0], first_result((0.0, 0.0), val=0.5)) == CONTINUE
    assert report(scheduler, trials[1], first_result((1.0, 1.0), val=0.9)) == CONTINUE
    # A scratch trial reports no LogME: the rung leaves it to ASHA, which keeps it.
    assert report(scheduler, trials[2], first_result(None, val=0.95)) == CONTINUE
    # ASHA's rung at epoch 1 stops a poor one whatever its LogME: its STOP stands.
    assert report(scheduler, trials[3], first_result((3.0, 3.0), val=0.1)) == STOP
    assert scheduler.stopped == []  # neither stop was the rung's
    # ... and its score still counts: depth 0 now has 3.0, so depth 1 (1.0) is below the median.
    scheduler.on_trial_add(None, late := trial("t4", 1))
    assert report(scheduler, late, first_result((1.0, 1.0), val=0.99)) == STOP
    assert scheduler.stopped == ["t4"]


def test_a_score_that_is_not_finite_is_not_ranked() -> None:
    assert mean_logme(first_result((1.0, 2.0))) == 1.5 and mean_logme(first_result(None)) is None
    assert mean_logme(first_result((float("nan"), 2.0))) is None
    scheduler = build_trial_scheduler(parse_space(rung_raw(logme_min_configs=2)))
    scheduler.set_search_properties("target/val_acc", "max")
    assert report(scheduler, trial("t0", 0), first_result((1.0, 1.0))) == CONTINUE
    assert report(scheduler, trial("t1", 1), first_result((float("nan"), 0.0))) == CONTINUE
    # The NaN did not enter the pool: the rung still ranks (depth 2 is below depth 0).
    assert report(scheduler, trial("t2", 2), first_result((0.0, 0.0))) == STOP


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logme_quantile": 1.0}, "less than 1"),
        ({"logme_quantile": 0.0}, "greater than 0"),
        ({"logme_min_configs": 1}, "greater than or equal to 2"),
        ({"type": "two_axis", "stage1_budgets": [1, 2]}, "does not combine with two_axis"),
    ],
)
def test_logme_rung_space_rules(change: dict[str, Any], message: str) -> None:
    with pytest.raises(DtlrayError, match=message):
        parse_space(rung_raw(**change))


def test_logme_rung_needs_a_stage1() -> None:
    raw = rung_raw()
    raw["trial"]["stage2"]["init"] = "scratch"
    with pytest.raises(DtlrayError, match="stage2.init: scratch"):
        parse_space(raw)
    raw["search"]["stage2.init"] = {"choices": ["scratch", "stage1"]}  # some trials have one
    assert parse_space(raw).scheduler.logme_quantile == 0.5
