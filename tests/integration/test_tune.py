"""The search on real local Ray: Tune + Optuna (seeded TPE) + ASHA, stage-1 reuse, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import dtlray
from dtlray.experiment import STAGE1_CACHE_DIR as CACHE_DIR
from dtlray.ray_session import free_port
from dtlray.report.records import read_jsonl
from dtlray.search import summarize_best
from dtlray.search_space import parse_space

pytestmark = pytest.mark.slow  # starts a real local Ray

TINY = Path("search_spaces/tiny.yaml")


def _finetune_only_space(data_root: Path) -> dict:
    """tiny.yaml searching finetune settings only: every trial shares one stage-1 config."""
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    raw["search"] = {
        "stage2.lr": {"type": "float", "low": 0.003, "high": 0.1, "log": True},
        "stage2.lr_mult_heads": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
    }
    raw["num_samples"] = 4
    raw["max_concurrent_trials"] = 2
    raw["scheduler"] = {"type": "asha", "grace_period": 1}
    return raw


def test_search_shares_stage1_and_every_trial_reports(
    ray_cluster: None, data_root: Path, tmp_path: Path
) -> None:
    space = parse_space(_finetune_only_space(data_root))
    tuner = dtlray.build_tuner(space, storage_path=str(tmp_path), name="shared")
    results = tuner.fit()  # a normal ResultGrid

    assert len(results) == 4
    assert results.num_errors == 0, [r.error for r in results]
    for result in results:
        assert "target/val_acc" in result.metrics
        assert result.metrics["training_iteration"] >= 1
    # Four trials, one stage-1 config: pretrained exactly once (counted, not timed).
    misses = [r for r in results if not r.metrics["stage1/cache_hit"]]
    assert len(misses) == 1
    stored = sorted(p.name for p in (tmp_path / CACHE_DIR).iterdir())
    assert len(stored) == 2 and stored[1].startswith("tree-")  # the result, its constant phase
    # Optuna proposed the 4 configurations (the first is the space's defaults).
    lrs = {round(r.config["stage2.lr"], 6) for r in results}
    assert len(lrs) == 4 and 0.01 in lrs
    # Four trials on two slots: later trials run in an earlier trial's process (reuse_actors),
    # without paying a process start and torch's import again.
    assert len({r.metrics["pid"] for r in results}) <= 3

    summary = summarize_best(results, space, results.experiment_path)
    saved = json.loads((Path(results.experiment_path) / "best.json").read_text())
    assert saved["objective"]["value"] == summary["objective"]["value"]
    assert 0.0 <= saved["test"]["target/test_acc"] <= 1.0
    assert set(saved["test"]) >= {"target/digits/test_acc", "target/faces/test_acc"}
    # Each of the 3 hits saved what the one miss spent computing stage 1.
    spent = misses[0].metrics["stage1/compute_seconds"]
    assert spent > 0
    assert saved["stage1"] == {
        "hits": 3,
        "misses": 1,
        "scratch": 0,
        "continued": 0,  # one stage-1 budget: its stored constant phase has no longer one
        "epochs_continued": 0,
        "seconds_saved": pytest.approx(3 * spent),
    }

    assert json.loads((Path(results.experiment_path) / "space.json").read_text())["search"]
    _dashboard_serves_trials(Path(results.experiment_path), study_name="shared", trials=4)

    # The same name again is refused rather than mixed into the old experiment.
    with pytest.raises(dtlray.errors.DtlrayError, match="already exists; continue it with"):
        dtlray.build_tuner(space, storage_path=str(tmp_path), name="shared")


def _dashboard_serves_trials(experiment: Path, study_name: str, trials: int) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "dtlray", "dashboard", str(experiment), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.communicate()[0].decode()
                assert time.monotonic() < deadline, "dashboard did not answer in 60 s"
                time.sleep(0.5)
        (study,) = [s for s in studies if s["study_name"] == study_name]
        with urllib.request.urlopen(f"{base}/api/studies/{study['study_id']}") as response:
            detail = json.load(response)
        assert len(detail["trials"]) == trials
        complete = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert complete and all("stage2.lr" in {p["name"] for p in t["params"]} for t in complete)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _trial_results(experiment: Path) -> dict[str, list[dict]]:
    out = {}
    for path in experiment.glob("run_trial_fn_*/result.json"):
        # Tune may be writing the last line right now: read only whole lines (as the report).
        out[path.parent.name.split("_")[3]] = read_jsonl(path)
    return out


def test_interrupted_search_resumes_without_rerunning_completed_trials(
    data_root: Path, tmp_path: Path
) -> None:
    space_file = tmp_path / "space.yaml"
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    # Enough trials that Ctrl-C after the first one lands mid-search: later trials reuse the
    # trial process and take a few seconds each.
    raw["num_samples"] = 6
    raw["max_concurrent_trials"] = 1
    # One fusion depth: a single stage 1, computed by the first trial and reused by the rest.
    del raw["search"]["model.fusion_depth"]
    raw["scheduler"] = {"type": "fifo"}
    epochs = raw["trial"]["stage2"]["epochs"] + 1  # set on the command line, not in the file
    space_file.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "results"
    experiment = storage / "resume"
    cmd = [sys.executable, "-m", "dtlray", "tune", str(space_file)]
    cmd += ["--storage-path", str(storage), "--name", "resume", "--set", f"stage2.epochs={epochs}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    completed: dict[str, list[dict]] = {}
    while time.monotonic() < deadline and first.poll() is None:
        trials = _trial_results(experiment)
        # FIFO: a trial with a result per finetune epoch has finished.
        completed = {t: r for t, r in trials.items() if len(r) == epochs}
        if completed:
            break
        time.sleep(2)
    assert completed, "no trial completed before the deadline:\n" + (
        first.communicate()[0].decode()[-3000:] if first.poll() is not None else ""
    )
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    out = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 130, out[-3000:]
    assert f"--set stage2.epochs={epochs} --resume" in out  # the resume command it prints

    # A resume that would change the started search is refused, before Ray starts.
    changed = [*cmd[:-1], "stage2.epochs=5", "--resume"]
    refused = subprocess.run(changed, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "these options change it: trial.stage2.epochs" in refused.stderr

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, timeout=900)
    out = resumed.stdout.decode() + resumed.stderr.decode()
    assert resumed.returncode == 0, out[-3000:]
    assert "best trial" in out
    after = _trial_results(experiment)
    assert len(after) == raw["num_samples"]
    for trial_id, lines in completed.items():
        assert after[trial_id] == lines, f"completed trial {trial_id} was run again"
    assert all(len(lines) == epochs for lines in after.values())  # resumed with the --set
    best = json.loads((experiment / "best.json").read_text())
    assert best["config"]["stage2"]["epochs"] == epochs
    assert best["epochs"] == epochs


def _checked_space(raw: dict, tmp_path: Path, shows: str) -> Any:
    """The space, after ``dtlray check`` passed on it as a file and its summary ``shows``."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    check = subprocess.run(
        [sys.executable, "-m", "dtlray", "check", str(path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert shows in check.stdout
    return parse_space(raw)


def test_two_axis_search_promotes_the_best_and_writes_best_json(
    ray_cluster: None, data_root: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    raw["trial"]["stage1"]["schedule"] = "wsd"
    raw["trial"]["stage2"]["epochs"] = 2
    raw["search"] = {
        "model.fusion_depth": {"type": "int", "low": 0, "high": 1},
        "stage2.lr": {"type": "float", "low": 0.003, "high": 0.1, "log": True},
    }
    # Half an epoch of the 1,024 source rows (8 steps of 64, constant 6), then a whole one.
    raw["scheduler"] = {"type": "two_axis", "stage1_budgets": [0.5, 1], "grace_period": 1}
    raw["num_samples"] = 5
    raw["max_concurrent_trials"] = 2
    space = _checked_space(raw, tmp_path, shows="two_axis")
    results = dtlray.build_tuner(space, storage_path=str(tmp_path), name="two-axis").fit()
    assert results.num_errors == 0, [r.error for r in results]
    assert len(results) == 5
    # New configurations at the small budget with a short finetune; the best went on.
    small = [r for r in results if r.config["stage1.epochs"] == 0.5]
    promoted = [r for r in results if r.config["stage1.epochs"] == 1]
    assert len(small) >= 3 and len(promoted) >= 1
    assert all(r.config["stage2.epochs"] == 1 for r in small)
    assert all(r.config["stage2.epochs"] == 2 for r in promoted)
    searched = ("model.fusion_depth", "stage2.lr")
    small_configs = [{k: r.config[k] for k in searched} for r in small]
    for r in promoted:
        assert {k: r.config[k] for k in searched} in small_configs
        # Its stage 1 continued the constant phase the half-epoch run stored, mid-epoch (or,
        # when another promoted trial of its depth had finished it, reused that whole).
        assert r.metrics["stage1/reused_epochs"] == (1 if r.metrics["stage1/cache_hit"] else 0.375)
    summary = summarize_best(results, space, results.experiment_path)
    best = json.loads((Path(results.experiment_path) / "best.json").read_text())
    assert best["config"]["stage1"]["epochs"] == best["searched"]["stage1.epochs"]
    assert summary["stage1"]["continued"] >= 1


def test_logme_rung_stops_trials_whose_stage1_ranks_low(
    ray_cluster: None, data_root: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    raw["search"] = {
        "model.fusion_depth": {"type": "int", "low": 0, "high": 1},
        "stage2.lr": {"type": "float", "low": 0.003, "high": 0.1, "log": True},
    }
    # Once 2 stage-1 configurations are scored, only the best-scored one finetunes on.
    raw["scheduler"] = {"type": "fifo", "logme_quantile": 0.99, "logme_min_configs": 2}
    raw["num_samples"] = 6
    raw["max_concurrent_trials"] = 1  # one at a time: the order of first results is known
    # Random, seeded: the same depths whatever the accuracies -- 1, 0, 1, 0, 0, 0 (the default
    # point first). Both depths run again after both are scored, so the rung stops a trial
    # whichever of them LogME ranks lower (CPU types differ in that: seed 0's depths left only
    # the last trial to stop, and only where its depth happened to score lower).
    raw["searcher"] = {"type": "random", "seed": 2}
    space = _checked_space(raw, tmp_path, shows="LogME rung at the 0.99 quantile")
    results = dtlray.build_tuner(space, storage_path=str(tmp_path), name="logme").fit()
    assert results.num_errors == 0, [r.error for r in results]

    # Replay the rule on what the trials reported, in the order they ran: Tune numbers its
    # trial directories in creation order (<trainable>_<id>_<number>_...), one at a time here.
    def number(r: Any) -> int:
        return int(Path(r.path).name.split("_")[4])

    in_order = sorted(results, key=number)
    assert [r.config["model.fusion_depth"] for r in in_order] == [1, 0, 1, 0, 0, 0]
    scores: dict[int, float] = {}
    expected = set()
    for r in in_order:
        first = read_jsonl(Path(r.path) / "result.json")[0]
        score = sum(first[f"target/{t}/logme"] for t in ("digits", "faces")) / 2
        scores[r.config["model.fusion_depth"]] = score
        if len(scores) >= 2 and score < np.quantile(list(scores.values()), 0.99):
            expected.add(r.metrics["trial_id"])
    stopped = {r.metrics["trial_id"] for r in results if r.metrics["training_iteration"] == 1}
    # FIFO stops nothing, and every trial that was not stopped ran its 2 epochs.
    assert stopped == expected and expected, scores
    assert all(r.metrics["training_iteration"] == 2 for r in results if r.metrics["trial_id"]
               not in stopped)  # fmt: skip
