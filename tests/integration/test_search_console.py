"""A real ``dtlray tune`` from the command line: a diverging trial, ASHA stops, the mirrored
Optuna study's trial states, and a console a person can read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

pytestmark = pytest.mark.slow  # starts a real local Ray

TINY = Path("search_spaces/tiny.yaml")
EPOCHS = 3


def test_diverging_trial_ends_at_once_and_states_are_true(data_root: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    raw["trial"]["stage2"]["epochs"] = EPOCHS
    # The first trial is the space's default point: a learning rate that diverges at once.
    raw["search"] = {
        "stage2.lr": {"type": "float", "low": 0.003, "high": 10.0, "log": True, "default": 10.0},
        "stage2.lr_mult_heads": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
    }
    raw["num_samples"] = 5
    raw["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AIR_NEW_OUTPUT", None)
    cmd = [sys.executable, "-m", "dtlray", "tune", str(space), "--storage-path", str(storage)]
    result = subprocess.run(
        cmd + ["--name", "console"], env=env, capture_output=True, text=True, timeout=900
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]

    # The console: dtlray's lines, none of Ray's internal noise.
    assert "core_worker.cc" not in out
    assert "Reporting training result" not in out
    assert "Trial status:" not in out and "Configuration for experiment" not in out
    assert "[search] trial 1/5" in out and "best target/val_acc" in out
    assert "[search] 5/5 done" in out and "0 running, 0 pending" in out  # the last trial counted
    assert "DIVERGED: diverged in finetune epoch 1" in out and "lower the learning rate" in out

    experiment = storage / "console"
    trials = {}
    for path in experiment.glob("run_trial_fn_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        trials[rows[-1]["trial_id"]] = rows
    assert len(trials) == 5
    diverged = {t for t, rows in trials.items() if rows[-1].get("diverged")}
    first = next(t for t, rows in trials.items() if rows[0]["config"]["stage2.lr"] == 10.0)
    assert first in diverged
    assert len(trials[first]) == 1 and trials[first][-1]["epoch"] == 1  # ended in epoch 1
    stopped = {t for t, rows in trials.items() if t not in diverged and rows[-1]["epoch"] < EPOCHS}
    completed = set(trials) - diverged - stopped

    # The mirrored study: COMPLETE only for finished trials, PRUNED where Tune stopped early
    # (with the per-epoch values) and for the diverged ones.
    study = optuna.load_study(study_name="console", storage=f"sqlite:///{experiment}/optuna.db")
    by_lr = {round(t.params["stage2.lr"], 9): t for t in study.trials}
    assert len(by_lr) == 5
    for trial_id, rows in trials.items():
        ot = by_lr[round(rows[0]["config"]["stage2.lr"], 9)]
        if trial_id in completed:
            assert ot.state == optuna.trial.TrialState.COMPLETE, trial_id
            assert ot.value == pytest.approx(rows[-1]["target/val_acc"])
        else:
            assert ot.state == optuna.trial.TrialState.PRUNED, trial_id
            if trial_id in stopped:
                assert max(ot.intermediate_values) == rows[-1]["training_iteration"]
        if trial_id in diverged:
            assert ot.user_attrs["dtlray_status"] == "diverged"

    best = json.loads((experiment / "best.json").read_text())
    assert best["trial_id"] not in diverged
    assert best["diverged"] == len(diverged) >= 1
    assert best["config"]["stage2"]["epochs"] == EPOCHS
