"""``dtlray report`` on synthetic experiment directories written in Tune's real file format."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from dtlray.baseline import BASELINE_FILE
from dtlray.config import TrialConfig
from dtlray.errors import DtlrayError
from dtlray.experiment import BASELINE_DIR, BEST_FILE, PREDICTIONS_FILE, RUNNING_FILE
from dtlray.report import build_report, main_args, sections
from dtlray.report import cli as report_cli
from dtlray.report.plots import PLOTS, plot_curves
from dtlray.report.records import TrialRecord, load_experiment, load_trials
from dtlray.report.study import build_study, infer_distributions, param_importances
from dtlray.report.transfer import (
    GainRow,
    Stage1Summary,
    gain_intervals,
    load_baseline,
    scratch_config,
    stage1_summary,
    transfer_gain,
)
from dtlray.search_space import SearchSpace, parse_space, to_optuna_distributions

TARGETS = ("digits", "faces")
DATE = "2026-11-27_21-53-44"


def tiny_space() -> SearchSpace:
    return parse_space(yaml.safe_load(Path("search_spaces/tiny.yaml").read_text()))


@dataclass
class FakeTrial:
    """What one fake Tune trial reported."""

    trial_id: str
    params: dict[str, Any]
    val_accs: list[float]  # target/val_acc per finetune epoch
    stage1: str = "computed"  # computed | reused | scratch
    compute_seconds: float = 10.0
    status: str = "TERMINATED"
    error: str | None = None
    reports_mode: bool = True  # False: a trial from before `stage1/mode` existed
    diverged: bool = False  # its last report is the worker loop's divergence verdict
    continued_epochs: int = 0  # computed on top of a stored constant phase of this many epochs
    own_seconds: float | None = None  # stage 1 seconds of its own (continued: the remainder)


def _rows(trial: FakeTrial, number: int, exp: Path) -> list[dict[str, Any]]:
    rows = []
    for epoch, acc in enumerate(trial.val_accs, start=1):
        # Per-target accuracies whose mean is the objective, as the trial loop reports them.
        digits, faces = acc - 0.1, acc + 0.1
        rows.append(
            {
                "target/digits/val_acc": digits,
                "target/digits/val_loss": 2.0 - acc,
                "target/faces/val_acc": faces,
                "target/faces/val_loss": 1.0 - acc,
                "target/val_acc": acc,
                "target/val_loss": 1.5 - acc,
                "train/loss": 1.4,
                "train/samples_per_s": 200.0,
                "train/epoch_seconds": 0.6,
                "epoch": epoch,
                **_stage1_metrics(trial),
                "checkpoint_path": f"{exp}/train-{trial.trial_id}/checkpoint_{epoch}",
                "timestamp": 1795816481 + epoch,
                "checkpoint_dir_name": None,
                "done": epoch == len(trial.val_accs) and trial.status == "TERMINATED",
                "training_iteration": epoch,
                "trial_id": trial.trial_id,
                "date": DATE,
                "time_this_iter_s": 40.0,
                "time_total_s": 40.0 * epoch,
                "pid": 8824,
                "hostname": "vm",
                "node_ip": "192.0.2.2",
                "config": trial.params,
                "time_since_restore": 40.0 * epoch,
                "iterations_since_restore": epoch,
            }
        )
    if trial.diverged:  # the one report of a trial whose loss went non-finite: NaN metrics
        nan = float("nan")
        rows[-1].update(
            {k: nan for k, v in rows[-1].items() if k.startswith(("target/", "train/"))}
        )
        reason = f"diverged in finetune epoch {len(rows)}, step 1: the training loss is nan"
        rows[-1].update({"diverged": True, "diverged/reason": reason, "done": True})
    return rows


def _stage1_metrics(trial: FakeTrial) -> dict[str, Any]:
    """The stage-1 metrics of each report, as the worker loop of the trial's time wrote them."""
    scratch = trial.stage1 == "scratch"
    metrics: dict[str, Any] = {
        "stage1/seconds": 0.2 if trial.stage1 == "reused" else trial.compute_seconds,
        "stage1/compute_seconds": 0.0 if scratch else trial.compute_seconds,
    }
    if trial.continued_epochs:
        metrics["stage1/seconds"] = trial.own_seconds
        metrics["stage1/reused_epochs"] = trial.continued_epochs
    if not trial.reports_mode:  # older loops: a NaN source accuracy and a cache flag for all
        source = float("nan") if scratch else 0.3
        return {"source/val_acc": source, "stage1/cache_hit": trial.stage1 == "reused", **metrics}
    metrics["stage1/mode"] = trial.stage1
    if not scratch:  # a scratch trial claims no stage 1
        metrics |= {"source/val_acc": 0.3, "stage1/cache_hit": trial.stage1 == "reused"}
    return metrics


def write_experiment(
    exp: Path,
    trials: list[FakeTrial],
    *,
    space: SearchSpace | None = None,
    with_space_file: bool = True,
    with_best: bool = True,
    with_state: bool = True,
) -> Path:
    """A Tune experiment directory like ``dtlray tune`` leaves it (``space.json`` optional)."""
    space = space or tiny_space()
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"\x80\x05N.")
    if with_space_file:
        (exp / "space.json").write_text(json.dumps(space.model_dump(mode="json")))
    trial_data = []
    for number, trial in enumerate(trials, start=1):
        tag = f"{number}_" + ",".join(f"{k.replace('.', '_')}={v}" for k, v in trial.params.items())
        dirname = f"run_trial_fn_{trial.trial_id}_{tag}_{DATE}"
        trial_dir = exp / dirname
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps(trial.params, indent=2))
        rows = _rows(trial, number, exp)
        (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if trial.error:
            (trial_dir / "error.txt").write_text(
                f"Failure # 1 (occurred at {DATE})\nTraceback (most recent call last):\n"
                f'  File "x.py", line 1, in <module>\n{trial.error}\n'
            )
        info = {
            "stub": False,
            "trainable_name": "run_trial_fn",
            "trial_id": trial.trial_id,
            "config": trial.params,
            "experiment_tag": tag,
            "status": trial.status,
            "relative_logdir": dirname,
        }
        trial_data.append([json.dumps(info, indent=2), json.dumps({"num_failures": "0"})])
    if with_state:
        state = {"trial_data": trial_data, "runner_data": {}, "stats": {"start_time": 0.0}}
        (exp / f"experiment_state-{DATE}.json").write_text(json.dumps(state))
    scored = [t for t in trials if t.val_accs]
    if with_best and scored:
        (exp / "best.json").write_text(json.dumps(_best_json(exp, space, trials)))
    return exp


def _best_json(exp: Path, space: SearchSpace, trials: list[FakeTrial]) -> dict[str, Any]:
    """What ``summarize_best`` writes for the best of ``trials``."""
    best = max((t for t in trials if t.val_accs), key=lambda t: t.val_accs[-1])
    last = _rows(best, 0, exp)[-1]
    return {
        "objective": {"metric": "target/val_acc", "mode": "max", "value": last["target/val_acc"]},
        "trial_id": best.trial_id,
        "searched": best.params,
        "config": space.trial_config(best.params).to_dict(),
        "val": {k: v for k, v in last.items() if k.endswith("val_acc")},
        "epochs": len(best.val_accs),
        "checkpoint_path": last["checkpoint_path"],
        "trials": len(trials),
        "errors": sum(1 for t in trials if t.status == "ERROR"),
        "stage1": {"hits": 1, "misses": 2, "seconds_saved": 10.0},
        "test": {
            "target/digits/test_acc": 0.40,
            "target/faces/test_acc": 0.86,
            "target/test_acc": 0.63,
        },
    }


def p(depth: int, lr: float, mult: float) -> dict[str, Any]:
    return {"model.fusion_depth": depth, "stage2.lr": lr, "stage2.lr_mult_backbone": mult}


def standard_trials() -> list[FakeTrial]:
    return [
        FakeTrial("a3ac03eb", p(1, 0.01, 1.0), [0.54, 0.64]),
        FakeTrial("35969fb1", p(1, 0.0368, 0.4), [0.52, 0.66], compute_seconds=14.0),
        FakeTrial("d8c692e9", p(1, 0.0133, 0.44), [0.57, 0.63], stage1="reused"),
        FakeTrial("bfebdb1e", p(0, 0.0924, 0.22), [0.47]),  # stopped by ASHA after epoch 1
        FakeTrial(
            "c0ffee00",
            p(2, 0.005, 0.3),
            [],
            status="ERROR",
            error="RuntimeError: CUDA out of memory",
        ),
    ]


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    return write_experiment(tmp_path / "results" / "exp", standard_trials())


def predictions(n: int, correct: range | list[int]) -> dict[str, list[int]]:
    """Per-image predictions of ``n`` test images, right exactly on the indices ``correct``."""
    labels = [i % 10 for i in range(n)]
    right = set(correct)
    return {
        "label": labels,
        "pred": [y if i in right else (y + 1) % 10 for i, y in enumerate(labels)],
    }


def write_baseline(
    exp: Path,
    digits: float,
    faces: float,
    config: dict | None = None,
    runs: list[dict[str, dict[str, list[int]]]] | None = None,
) -> None:
    """A stored scratch baseline with these mean test accuracies and per-run predictions."""
    best = json.loads((exp / "best.json").read_text())
    metrics = {
        "target/digits/test_acc": digits,
        "target/faces/test_acc": faces,
        "target/test_acc": (digits + faces) / 2,
    }
    if runs is None:  # predictions that give these accuracies on 100 images per target
        runs = [{"digits": predictions(100, range(round(digits * 100))),
                 "faces": predictions(100, range(round(faces * 100)))}]  # fmt: skip
    record = {
        "trial_id": best["trial_id"],
        "config": config or scratch_config(best).to_dict(),
        "epochs": best["epochs"],
        "metrics": metrics,
        "runs": [
            {"seed": k, "metrics": metrics, "run_path": "x", "predictions": run}
            for k, run in enumerate(runs)
        ],
    }
    (exp / BASELINE_DIR).mkdir(exist_ok=True)
    (exp / BASELINE_DIR / BASELINE_FILE).write_text(json.dumps(record))


def write_finetuned_predictions(exp: Path, tasks: dict[str, dict[str, list[int]]]) -> None:
    best = json.loads((exp / "best.json").read_text())
    payload = {"trial_id": best["trial_id"], "split": "test", "tasks": tasks}
    (exp / PREDICTIONS_FILE).write_text(json.dumps(payload))


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """The cells of the first table under ``## heading`` (header and rule left out)."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("\n|") + 1 :].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


# -- reading ---------------------------------------------------------------------------------


def test_trials_are_read_in_start_order_with_status_epochs_and_stage1(experiment: Path) -> None:
    trials = load_trials(experiment, fixed_epochs=2)
    assert [t.trial_id for t in trials] == [
        "a3ac03eb",
        "35969fb1",
        "d8c692e9",
        "bfebdb1e",
        "c0ffee00",
    ]
    by_id = {t.trial_id: t for t in trials}
    assert by_id["35969fb1"].value("target/val_acc") == 0.66
    assert by_id["bfebdb1e"].epochs == 1
    assert by_id["bfebdb1e"].status_text == "stopped early"
    assert by_id["a3ac03eb"].status_text == "completed"
    assert by_id["c0ffee00"].status_text == "error"
    assert by_id["c0ffee00"].error == "RuntimeError: CUDA out of memory"
    assert by_id["c0ffee00"].value("target/val_acc") is None
    assert by_id["d8c692e9"].stage1 == "reused"
    assert by_id["a3ac03eb"].stage1 == "computed"


def test_useful_seconds_count_the_stage1_a_trial_computed_and_its_train_passes() -> None:
    def epoch(mode: str, seconds: float) -> dict[str, Any]:
        return {"stage1/mode": mode, "stage1/seconds": 30.0, "train/epoch_seconds": seconds}

    computed = TrialRecord("a", 1, {}, (epoch("computed", 2.0), epoch("computed", 3.0)), "X")
    reused = TrialRecord("b", 2, {}, (epoch("reused", 2.0), epoch("reused", float("nan"))), "X")
    assert computed.useful_seconds == 35.0  # its own stage 1 + both train passes
    assert reused.useful_seconds == 2.0  # another trial's stage 1; a diverged epoch's NaN is 0


def test_statuses_without_tunes_experiment_state_come_from_the_trial_files(
    tmp_path: Path,
) -> None:
    exp = write_experiment(tmp_path / "exp", standard_trials(), with_state=False)
    (exp / "tuner.pkl").write_bytes(b"x")
    by_id = {t.trial_id: t for t in load_trials(exp, fixed_epochs=2)}
    assert by_id["c0ffee00"].status_text == "error"
    assert by_id["bfebdb1e"].status_text == "stopped early"
    assert by_id["35969fb1"].status_text == "completed"


def test_a_trial_that_failed_once_and_then_finished_is_not_an_error(tmp_path: Path) -> None:
    trials = standard_trials()[:2]
    trials[0].error = "RayActorError: the actor died unexpectedly"
    exp = write_experiment(tmp_path / "exp", trials)
    first = load_trials(exp, fixed_epochs=2)[0]
    assert first.status_text == "completed (after a retry)"


def test_a_half_written_last_result_line_is_ignored(experiment: Path) -> None:
    result = next(experiment.glob("run_trial_fn_a3ac03eb_*/result.json"))
    result.write_text(result.read_text() + '{"target/val_acc": 0.9, "trai')
    trial = next(t for t in load_trials(experiment) if t.trial_id == "a3ac03eb")
    assert trial.value("target/val_acc") == 0.64


# -- the results table -------------------------------------------------------------------------


def test_results_table_ranks_trials_and_shows_epochs_stage1_and_status(experiment: Path) -> None:
    out = build_report(experiment)
    md = (out / "report.md").read_text()
    rows = _table_rows(md, "All trials")
    # columns: #, trial, 3 params, objective, epochs, stage 1, status
    assert [r[1] for r in rows] == ["**35969fb1**", "a3ac03eb", "d8c692e9", "bfebdb1e", "c0ffee00"]
    assert rows[0] == ["1", "**35969fb1**", "1", "0.0368", "0.4", "0.6600", "2/2", "computed",
                       "completed"]  # fmt: skip
    assert rows[2][7] == "reused"
    assert rows[3][5:] == ["0.4700", "1/2", "computed", "stopped early"]
    assert rows[4][5:] == ["—", "0/2", "—", "error"]
    assert "RuntimeError: CUDA out of memory" in md
    header = next(line for line in md.splitlines() if line.startswith("| # | trial |"))
    assert "`stage2.lr_mult_backbone`" in header and "epochs" in header


def test_best_section_has_val_and_test_per_target(experiment: Path) -> None:
    md = (build_report(experiment) / "report.md").read_text()
    best = md.split("## Best configuration\n", 1)[1].split("\n## ", 1)[0]
    assert "| digits | 0.5600 | 0.4000 |" in best
    assert "| faces | 0.7600 | 0.8600 |" in best
    assert "| **mean** | 0.6600 | 0.6300 |" in best
    assert "lr_mult_backbone: 0.4" in best  # the full config, as YAML


# -- plots and the files -----------------------------------------------------------------------


def test_report_writes_md_html_and_valid_pngs(experiment: Path) -> None:
    write_baseline(experiment, digits=0.20, faces=0.90)
    out = build_report(experiment)
    assert out == experiment / "report"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", *PLOTS}
    for name in PLOTS:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            assert img.width >= 600 and img.height >= 200
            # A drawn plot, not a blank canvas.
            assert len(img.convert("L").getcolors(maxcolors=1 << 16) or [0] * 99) > 10
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in PLOTS:
        assert f"]({name})" in md
        assert f'<img src="{name}"' in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not list(experiment.glob(".report-*")), "temporary directories left behind"


def test_html_escapes_text_from_the_experiment(tmp_path: Path) -> None:
    space = parse_space(
        {
            **yaml.safe_load(Path("search_spaces/tiny.yaml").read_text()),
            "search": {"stage2.schedule": {"choices": ["constant", "cosine"]}},
        }
    )
    trials = [
        FakeTrial("aaaa0001", {"stage2.schedule": "constant"}, [0.5, 0.6]),
        FakeTrial("aaaa0002", {"stage2.schedule": "cosine"}, [0.5, 0.7]),
        FakeTrial(
            "aaaa0003",
            {"stage2.schedule": "cosine"},
            [],
            status="ERROR",
            error="ValueError: bad <script>alert(1)</script> & co",
        ),  # fmt: skip
    ]
    exp = write_experiment(tmp_path / "exp", trials, space=space)
    page = (build_report(exp) / "report.html").read_text()
    assert "<script>" not in page
    assert "bad &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page


def test_plotting_leaves_global_matplotlib_style_alone(experiment: Path) -> None:
    before = dict(matplotlib.rcParams)
    build_report(experiment)
    assert matplotlib.rcParams["axes.facecolor"] == before["axes.facecolor"]
    assert matplotlib.rcParams["axes.grid"] == before["axes.grid"]


def test_a_failed_rebuild_keeps_the_previous_report(
    experiment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = build_report(experiment)
    previous = (out / "report.md").read_text()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sections, "plot_curves", broken)
    with pytest.raises(OSError, match="disk full"):
        build_report(experiment)
    assert (out / "report.md").read_text() == previous
    assert {p.name for p in out.iterdir()} >= {"report.html", *PLOTS}
    assert not list(experiment.glob(".report-*")), "temporary directories left behind"


def test_learning_curves_draw_the_top_k(experiment: Path) -> None:
    exp = load_experiment(experiment)
    top = plot_curves(exp, 2, experiment / "c.png")
    assert [t.trial_id for t in top] == ["35969fb1", "a3ac03eb"]
    with Image.open(experiment / "c.png") as img:
        assert img.format == "PNG"
    with pytest.raises(DtlrayError, match="--top-k must be at least 1"):
        build_report(experiment, top_k=0)


# -- the Optuna study and importances -----------------------------------------------------------


def test_study_uses_the_saved_space_and_the_true_trial_states(experiment: Path) -> None:
    exp = load_experiment(experiment)
    assert exp.distributions == to_optuna_distributions(tiny_space())
    study = build_study(exp)
    state = optuna.trial.TrialState
    # Finished trials are COMPLETE with their last value; the one ASHA stopped after 1 of its
    # 2 epochs is PRUNED (its value is an intermediate one); the failed one FAIL.
    assert [t.state for t in study.trials] == [state.COMPLETE] * 3 + [state.PRUNED, state.FAIL]
    assert [t.value for t in study.trials[:3]] == [0.64, 0.66, 0.63]
    assert study.trials[0].intermediate_values == {1: 0.54, 2: 0.64}
    assert study.trials[3].intermediate_values == {1: 0.47}
    assert study.trials[3].user_attrs["status"] == "stopped early"
    assert study.best_trial.user_attrs["tune_trial_id"] == "35969fb1"
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_without_space_json_the_ranges_are_inferred_and_said_so(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp", standard_trials(), with_space_file=False)
    loaded = load_experiment(exp)
    dists = loaded.distributions
    assert dists["model.fusion_depth"] == optuna.distributions.IntDistribution(0, 2)
    assert dists["stage2.lr"] == optuna.distributions.FloatDistribution(0.005, 0.0924, log=True)
    assert dists["stage2.lr_mult_backbone"] == optuna.distributions.FloatDistribution(0.22, 1.0)
    md = (build_report(exp) / "report.md").read_text()
    assert "no `space.json`" in md


def test_infer_distributions_by_value_type() -> None:
    trials = [
        TrialRecord("a", 1, {"x": 1, "b": True, "s": "vgg11_bn", "f": 0.5}, (), "X"),
        TrialRecord("b", 2, {"x": 3, "b": False, "s": "resnet18", "f": 0.7}, (), "X"),
    ]
    dists = infer_distributions(trials)
    assert dists["x"] == optuna.distributions.IntDistribution(1, 3)
    assert dists["b"] == optuna.distributions.CategoricalDistribution([False, True])
    assert dists["s"] == optuna.distributions.CategoricalDistribution(["resnet18", "vgg11_bn"])
    assert dists["f"] == optuna.distributions.FloatDistribution(0.5, 0.7, log=False)


def test_values_outside_the_saved_space_fall_back_to_inferred_ranges(tmp_path: Path) -> None:
    trials = standard_trials()
    trials[0].params["stage2.lr"] = 0.5  # outside tiny.yaml's [0.003, 0.1]
    exp = load_experiment(write_experiment(tmp_path / "exp", trials))
    assert exp.distributions["stage2.lr"].high == 0.5
    assert any("outside" in note for note in exp.notes)


def test_importances_are_seeded_and_normalised(experiment: Path) -> None:
    exp = load_experiment(experiment)
    first, note = param_importances(build_study(exp))
    again, _ = param_importances(build_study(exp))
    assert note is None
    assert first == again
    assert set(first) == set(exp.distributions)
    assert sum(first.values()) == pytest.approx(1.0)


def _study(values: list[float | None], params: list[dict[str, Any]]) -> optuna.Study:
    dists = to_optuna_distributions(tiny_space())
    study = optuna.create_study(direction="maximize")
    for value, trial_params in zip(values, params, strict=True):
        state = (
            optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        )
        study.add_trial(
            optuna.trial.create_trial(
                params=trial_params,
                distributions={k: dists[k] for k in trial_params},
                value=value,
                state=state,
            )
        )
    return study


@pytest.mark.parametrize(
    ("values", "params", "expected"),
    [
        ([], [], "need at least 2 completed trials; this search has 0"),
        ([0.5], [p(1, 0.01, 0.5)], "need at least 2 completed trials; this search has 1"),
        ([0.5, None], [p(1, 0.01, 0.5), p(2, 0.02, 0.5)], "this search has 1"),
        ([0.5, 0.6], [p(1, 0.01, 0.5), p(1, 0.01, 0.5)], "every completed trial used the same"),
        ([0.5, 0.5, 0.5], [p(0, 0.01, 0.5), p(1, 0.02, 0.3), p(2, 0.05, 0.2)], "scored the same"),
        ([0.5, 0.6], [{}, {}], "no searched parameters"),
    ],
)
def test_importances_on_degenerate_studies_explain_why_not(
    values: list[float | None], params: list[dict[str, Any]], expected: str
) -> None:
    importances, note = param_importances(_study(values, params))
    assert importances == {}
    assert note is not None and expected in note


def test_a_single_trial_report_notes_missing_importances(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp", [FakeTrial("aaaa0001", p(1, 0.01, 0.5), [0.5, 0.6])])
    out = build_report(exp)
    assert not (out / "importance.png").exists()
    md = (out / "report.md").read_text()
    assert "Parameter importances need at least 2 completed trials" in md
    for name in ("history.png", "curves.png", "stage1.png"):
        assert (out / name).is_file()


# -- stage-1 reuse -----------------------------------------------------------------------------


def test_stage1_reuse_counts_and_seconds(tmp_path: Path) -> None:
    trials = [
        FakeTrial("aaaa0001", p(0, 0.01, 0.5), [0.5], compute_seconds=10.0),
        FakeTrial("aaaa0002", p(1, 0.01, 0.5), [0.5], compute_seconds=12.0),
        FakeTrial("aaaa0003", p(1, 0.02, 0.5), [0.5], stage1="reused", compute_seconds=12.0),
        FakeTrial("aaaa0004", p(1, 0.03, 0.5), [0.5], stage1="reused", compute_seconds=12.0),
        FakeTrial("aaaa0005", p(0, 0.03, 0.5), [0.5], stage1="reused", compute_seconds=10.0),
        FakeTrial("aaaa0006", p(0, 0.04, 0.5), [0.5], stage1="scratch"),
        FakeTrial("aaaa0007", p(0, 0.05, 0.5), [], status="ERROR", error="OSError: x"),
    ]
    exp = write_experiment(tmp_path / "exp", trials)
    summary = stage1_summary(load_trials(exp))
    assert summary == Stage1Summary(
        computed=2, reused=3, not_used=1, seconds_spent=22.0, seconds_saved=34.0
    )
    md = (build_report(exp) / "report.md").read_text()
    assert "2 trial(s) pretrained stage 1 (22 s), 3 reused a stored stage 1, saving 34 s" in md
    assert "1 trained from scratch" in md


def test_stage1_tree_continuations_count_only_what_they_trained(tmp_path: Path) -> None:
    budget = {"stage1.epochs": 4}
    trials = [
        FakeTrial("aaaa0001", p(0, 0.01, 0.5), [0.5], compute_seconds=10.0),
        # A longer budget of the same config: 20 s in all, 12 s of it its own (8 s continued).
        FakeTrial(
            "aaaa0002",
            {**p(0, 0.02, 0.5), **budget},
            [0.6],
            compute_seconds=20.0,
            continued_epochs=1,
            own_seconds=12.0,
        ),  # fmt: skip
        FakeTrial("aaaa0003", p(0, 0.03, 0.5), [0.5], stage1="reused", compute_seconds=10.0),
    ]
    exp = write_experiment(tmp_path / "exp", trials)
    summary = stage1_summary(load_trials(exp))
    assert summary == Stage1Summary(
        computed=2, reused=1, not_used=0, seconds_spent=22.0, seconds_saved=18.0,
        continued=1, epochs_continued=1,
    )  # fmt: skip
    md = (build_report(exp) / "report.md").read_text()
    assert "1 of the pretraining trial(s) continued a stored constant phase" in md
    assert "skipping 1 stage-1 epoch(s)" in md


@pytest.mark.parametrize("reports_mode", [True, False], ids=["stage1-mode", "inferred"])
def test_stage1_kind_per_trial_in_the_summary_and_the_table(
    tmp_path: Path, reports_mode: bool
) -> None:
    trials = [
        FakeTrial("aaaa0001", p(0, 0.01, 0.5), [0.5], compute_seconds=10.0),
        FakeTrial("aaaa0002", p(1, 0.01, 0.5), [0.6], stage1="reused", compute_seconds=10.0),
        FakeTrial("aaaa0003", p(1, 0.02, 0.5), [0.7], stage1="scratch"),
    ]
    for trial in trials:
        trial.reports_mode = reports_mode
    exp = write_experiment(tmp_path / "exp", trials)
    by_id = {t.trial_id: t for t in load_trials(exp)}
    assert [by_id[t.trial_id].stage1 for t in trials] == ["computed", "reused", "scratch"]
    assert stage1_summary(by_id.values()) == Stage1Summary(
        computed=1, reused=1, not_used=1, seconds_spent=10.0, seconds_saved=10.0
    )
    md = (build_report(exp) / "report.md").read_text()
    stage1_column = {r[1].strip("*"): r[7] for r in _table_rows(md, "All trials")}
    assert stage1_column == {"aaaa0001": "computed", "aaaa0002": "reused", "aaaa0003": "scratch"}
    assert "1 trained from scratch" in md


def test_stage1_mode_wins_over_the_older_metrics(tmp_path: Path) -> None:
    # A stage 1 computed in no measurable time: the older metrics alone would say scratch.
    exp = write_experiment(
        tmp_path / "exp", [FakeTrial("aaaa0001", p(0, 0.01, 0.5), [0.5], compute_seconds=0.0)]
    )
    assert load_trials(exp)[0].stage1 == "computed"
    result = next(exp.glob("run_trial_fn_aaaa0001_*/result.json"))
    row = json.loads(result.read_text())
    del row["stage1/mode"]
    result.write_text(json.dumps(row) + "\n")
    assert load_trials(exp)[0].stage1 == "scratch"


def test_an_unknown_stage1_mode_names_the_value_and_the_fix(tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path / "exp", [FakeTrial("aaaa0001", p(0, 0.01, 0.5), [0.5], stage1="warm")]
    )
    with pytest.raises(DtlrayError, match="trial aaaa0001 reported stage1/mode = 'warm'") as err:
        build_report(exp)
    assert "computed, reused, scratch" in str(err.value)
    assert "dtlray version that ran the search" in str(err.value)


# -- transfer gain -----------------------------------------------------------------------------


def test_transfer_gain_math_and_verdicts() -> None:
    finetuned = {"target/digits/test_acc": 0.80, "target/faces/test_acc": 0.60}
    scratch = {"target/digits/test_acc": 0.50, "target/faces/test_acc": 0.70}
    intervals = {"digits": (20.0, 40.0), "faces": (-25.0, 5.0), "mean": (1.0, 19.0)}
    rows = transfer_gain(TARGETS, finetuned, scratch, intervals=intervals)
    assert [r.target for r in rows] == ["digits", "faces", "mean"]
    assert rows[0].gain_pp == pytest.approx(30.0) and rows[0].verdict == "positive transfer"
    # -10 pp, but the interval includes 0: not called negative transfer.
    assert rows[1].gain_pp == pytest.approx(-10.0) and not rows[1].negative
    assert rows[1].verdict == "no significant difference"
    assert rows[2] == GainRow("mean", pytest.approx(0.70), pytest.approx(0.60), (1.0, 19.0))
    assert GainRow("x", 0.4, 0.5, (-12.0, -8.0)).negative
    assert GainRow("x", 0.4, 0.5).verdict == "no interval" and not GainRow("x", 0.4, 0.5).negative


def test_gain_interval_is_the_paired_bootstrap() -> None:
    """The count-drawing shortcut gives the interval of resampling image indices."""
    rng = np.random.default_rng(1)
    n = 200
    ours_right = rng.random(n) < 0.8
    theirs_right = np.where(rng.random(n) < 0.7, ours_right, ~ours_right)  # correlated
    ours = predictions(n, list(np.flatnonzero(ours_right)))
    theirs = predictions(n, list(np.flatnonzero(theirs_right)))
    low, high = gain_intervals(["digits"], {"digits": ours}, [{"digits": theirs}])["digits"]
    # The textbook paired bootstrap: resample image indices, score both on the same resample.
    idx = rng.integers(n, size=(20_000, n))
    naive = (ours_right[idx].mean(axis=1) - theirs_right[idx].mean(axis=1)) * 100
    assert low == pytest.approx(np.percentile(naive, 2.5), abs=0.6)
    assert high == pytest.approx(np.percentile(naive, 97.5), abs=0.6)
    gain = (ours_right.mean() - theirs_right.mean()) * 100
    assert low < gain < high


def test_gain_interval_width_follows_the_evidence() -> None:
    # One image apart on 30 faces: no test set that small can call it.
    thirty = gain_intervals(
        ["faces"], {"faces": predictions(30, range(27))}, [{"faces": predictions(30, range(26))}]
    )["faces"]
    assert thirty[0] <= 0 < thirty[1]
    assert GainRow("faces", 0.9, 26 / 30, thirty).verdict == "no significant difference"
    # Identical predictions: no difference at all, and not called transfer either way.
    same = predictions(50, range(40))
    assert gain_intervals(["faces"], {"faces": same}, [{"faces": same}])["faces"] == (0.0, 0.0)
    assert GainRow("faces", 0.8, 0.8, (0.0, 0.0)).verdict == "no significant difference"
    # Scratch seeds that disagree widen the interval beyond one seed's.
    ours = {"digits": predictions(400, range(300))}
    one = gain_intervals(["digits"], ours, [{"digits": predictions(400, range(240))}])["digits"]
    two = gain_intervals(
        ["digits"],
        ours,
        [{"digits": predictions(400, range(240))}, {"digits": predictions(400, range(160))}],
    )["digits"]
    assert two[1] - two[0] > 1.5 * (one[1] - one[0])


def test_gain_interval_refuses_predictions_of_other_images() -> None:
    ours = {"digits": predictions(10, range(5))}
    theirs = {"digits": {"label": [1] * 10, "pred": [1] * 10}}
    with pytest.raises(DtlrayError, match="digits test labels differ"):
        gain_intervals(["digits"], ours, [theirs])


def test_transfer_gain_names_the_missing_side() -> None:
    with pytest.raises(DtlrayError, match="baseline/result.json has no 'target/faces/test_acc'"):
        transfer_gain(TARGETS, {"target/digits/test_acc": 1, "target/faces/test_acc": 1}, {
            "target/digits/test_acc": 0.5})  # fmt: skip


def test_scratch_config_is_the_best_config_from_scratch_at_matched_epochs() -> None:
    cfg = tiny_space().trial_config(p(2, 0.05, 0.3))
    cfg = TrialConfig.from_flat({"stage2.epochs": 6, "stage2.freeze_backbone_epochs": 4}, base=cfg)
    best = {"config": cfg.to_dict(), "epochs": 3}  # ASHA stopped it after 3 of 6 epochs
    scratch = scratch_config(best)
    assert scratch.stage2.init == "scratch"
    assert scratch.stage2.epochs == 3
    assert scratch.stage2.freeze_backbone_epochs == 3
    assert scratch.model == cfg.model and scratch.data == cfg.data
    assert scratch.stage2.lr == cfg.stage2.lr


def test_stored_baseline_must_match_the_best_config(experiment: Path) -> None:
    best = json.loads((experiment / "best.json").read_text())
    expected = scratch_config(best)
    assert load_baseline(experiment, expected) == (None, "not run yet")
    other_root = TrialConfig.from_flat({"data.root": "/elsewhere"}, base=expected).to_dict()
    write_baseline(experiment, 0.3, 0.8, config=other_root)
    record, _ = load_baseline(experiment, expected)
    assert record is not None  # where the data lives does not matter
    other = TrialConfig.from_flat({"stage2.lr": 0.09}, base=expected).to_dict()
    write_baseline(experiment, 0.3, 0.8, config=other)
    record, why = load_baseline(experiment, expected)
    assert record is None and "another configuration" in why


def test_gain_table_in_the_report_with_intervals_and_in_best_json(experiment: Path) -> None:
    # best.json says finetuned 0.40 (digits) and 0.86 (faces); the predictions agree.
    write_finetuned_predictions(
        experiment, {"digits": predictions(100, range(40)), "faces": predictions(100, range(86))}
    )
    # Scratch gets 10 more digits right (a clear loss) and 1 more face (too few to call).
    write_baseline(experiment, digits=0.50, faces=0.87)
    md = (build_report(experiment) / "report.md").read_text()
    rows = _table_rows(md, "Transfer gain")
    assert [r[:4] for r in rows] == [
        ["digits", "0.4000", "0.5000", "-10.0"],
        ["faces", "0.8600", "0.8700", "-1.0"],
        ["**mean**", "0.6300", "0.6850", "-5.5"],
    ]
    verdicts = [r[5] for r in rows]
    assert verdicts == [
        "**negative transfer**",
        "no significant difference",
        "**negative transfer**",
    ]
    for row in rows:
        low, high = (float(x) for x in row[4].split(" to "))
        assert low <= float(row[3]) <= high
    assert "at matched epochs (2 finetune epoch(s) each)" in md
    assert "Negative transfer on digits:" in md
    assert "No significant difference on faces" in md
    # The same table, intervals included, is stored in best.json.
    best = json.loads((experiment / BEST_FILE).read_text())
    transfer = best["transfer"]
    assert transfer["confidence"] == 0.95 and transfer["baseline_seeds"] == 1
    assert transfer["targets"]["faces"]["verdict"] == "no significant difference"
    assert transfer["targets"]["digits"]["ci_pp"][1] < 0
    assert transfer["mean"]["gain_pp"] == pytest.approx(-5.5)
    html = (experiment / "report" / "report.html").read_text()
    assert "95% CI (pp)" in html and "no significant difference" in html


def test_gain_table_without_predictions_calls_nothing(experiment: Path) -> None:
    write_baseline(experiment, digits=0.50, faces=0.90)  # the best's checkpoint is gone
    md = (build_report(experiment) / "report.md").read_text()
    rows = _table_rows(md, "Transfer gain")
    assert [r[4:] for r in rows] == [["—", "no interval"]] * 3
    assert "No confidence intervals: the best trial's checkpoint is gone" in md
    assert "Negative transfer" not in md


def test_an_old_baseline_without_predictions_is_not_used(experiment: Path) -> None:
    write_baseline(experiment, digits=0.50, faces=0.90)
    path = experiment / BASELINE_DIR / BASELINE_FILE
    record = json.loads(path.read_text())
    del record["runs"]
    path.write_text(json.dumps(record))
    record, why = load_baseline(
        experiment, scratch_config(json.loads((experiment / BEST_FILE).read_text()))
    )
    assert record is None and "no per-image test predictions" in why


def test_without_a_baseline_the_report_says_how_to_get_one(experiment: Path) -> None:
    md = (build_report(experiment) / "report.md").read_text()
    section = md.split("## Transfer gain\n", 1)[1].split("\n## ", 1)[0]
    assert f"`dtlray report {experiment} --baseline`" in section
    assert "not run yet" in section


# -- bad inputs --------------------------------------------------------------------------------


def test_no_such_directory(tmp_path: Path) -> None:
    write_experiment(tmp_path / "exp", standard_trials())
    with pytest.raises(DtlrayError, match="no such experiment directory") as err:
        build_report(tmp_path / "exq")
    assert "<storage-path>/<name>" in str(err.value)
    assert "experiments there: exp" in str(err.value)


def test_not_an_experiment(tmp_path: Path) -> None:
    write_experiment(tmp_path / "results" / "exp", standard_trials())
    with pytest.raises(DtlrayError, match="is not a Ray Tune experiment directory") as err:
        build_report(tmp_path / "results")  # the storage path, not the experiment
    assert "experiments inside it: exp" in str(err.value)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DtlrayError, match="is a file; pass the experiment directory"):
        build_report(tmp_path / "f.txt")
    with pytest.raises(DtlrayError, match="`dtlray report s3://bucket/results/exp` mirrors"):
        build_report("s3://bucket/results/exp")


def test_a_running_experiment_is_refused(experiment: Path) -> None:
    marker = {"pid": os.getpid(), "host": socket.gethostname()}
    (experiment / RUNNING_FILE).write_text(json.dumps(marker))
    with pytest.raises(DtlrayError, match="is still running") as err:
        build_report(experiment)
    assert "wait for it to finish" in str(err.value)
    assert not (experiment / "report").exists()

    (experiment / RUNNING_FILE).write_text(json.dumps({"pid": 1, "host": "other-node"}))
    with pytest.raises(DtlrayError, match="still running on host other-node") as err:
        build_report(experiment)
    assert "delete that file if that run is gone" in str(err.value)


def test_a_stale_running_marker_warns_and_reports(
    experiment: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = {"pid": dead.pid, "host": socket.gethostname()}
    (experiment / RUNNING_FILE).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="dtlray.report"):
        out = build_report(experiment)
    assert (out / "report.md").is_file()
    assert f"names pid {dead.pid}, which no longer runs" in caplog.text

    (experiment / RUNNING_FILE).write_text("{half a marker")
    with caplog.at_level(logging.WARNING, logger="dtlray.report"):
        build_report(experiment)
    assert f"ignoring unreadable {experiment / RUNNING_FILE}" in caplog.text


def test_an_empty_experiment(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp", [])
    with pytest.raises(DtlrayError, match="is empty: none of its 0 trial") as err:
        build_report(exp)
    assert "--resume" in str(err.value)
    failed = [
        FakeTrial("aaaa0001", p(1, 0.01, 0.5), [], status="ERROR", error="OSError: x"),
        FakeTrial("aaaa0002", p(1, 0.02, 0.5), [], status="ERROR", error="OSError: y"),
    ]
    exp = write_experiment(tmp_path / "exp2", failed)
    with pytest.raises(DtlrayError, match=r"none of its 2 trial\(s\) reported 'target/val_acc' "
                       r"\(2 failed; see run_\*/error.txt\)"):  # fmt: skip
        build_report(exp)


def test_an_interrupted_search_without_best_json(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "results" / "exp", standard_trials(), with_best=False)
    with pytest.raises(DtlrayError, match="has no best.json: the search was interrupted") as err:
        build_report(exp)
    assert f"--storage-path {tmp_path / 'results'} --name exp --resume" in str(err.value)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_prints_where_the_report_is(
    experiment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_args([str(experiment), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert str(experiment / "report" / "report.html") in out
    assert str(experiment / "report" / "report.md") in out


def test_add_parser_registers_report_with_a_handler() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="dtlray")
    report_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "/x", "--baseline", "--address", "auto"])
    assert args.handler is report_cli._cmd_report
    assert (args.experiment, args.baseline, args.address, args.top_k) == ("/x", True, "auto", 5)


def test_importing_the_module_loads_neither_ray_nor_optuna() -> None:
    # The CLI imports the package to register the subcommand; the heavy modules load on use.
    code = (
        "import sys, dtlray.report; "
        "sys.exit(1 if {'torch', 'ray', 'optuna', 'matplotlib'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_diverged_trial_is_shown_as_diverged_not_as_a_low_score(tmp_path: Path) -> None:
    trials = [*standard_trials(), FakeTrial("dead0001", p(1, 0.09, 1.0), [0.2], diverged=True)]
    exp = load_experiment(write_experiment(tmp_path / "exp", trials))
    (dead,) = [t for t in exp.trials if t.trial_id == "dead0001"]
    assert dead.status_text == "diverged" and dead.diverged
    assert dead.value(exp.metric) is None  # no score at all, not a low one
    assert exp.ranked()[-1].trial_id in {"dead0001", "c0ffee00"}  # ranked with no value
    state = {t.user_attrs["tune_trial_id"]: t.state for t in build_study(exp).trials}
    assert state["dead0001"] == optuna.trial.TrialState.PRUNED
    md = (build_report(exp.path) / "report.md").read_text()
    (row,) = [r for r in _table_rows(md, "All trials") if "dead0001" in r[1]]
    assert row[-1] == "diverged"
