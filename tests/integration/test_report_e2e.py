"""``dtlray report --baseline`` on a real search: real Tune + Optuna, a real scratch baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

import dtlray
from dtlray.baseline import BASELINE_FILE
from dtlray.experiment import BASELINE_DIR, PREDICTIONS_FILE, SPACE_FILE
from dtlray.report import main_args
from dtlray.report.plots import PLOTS
from dtlray.search import summarize_best
from dtlray.search_space import parse_space

pytestmark = pytest.mark.slow  # starts a real local Ray

TINY = Path("search_spaces/tiny.yaml")


def test_report_of_a_real_search_with_its_scratch_baseline(
    ray_cluster: None, data_root: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    # Finetune settings only: both trials share one stage 1 (one computes, one reuses it).
    raw["search"] = {
        "stage2.lr": {"type": "float", "low": 0.003, "high": 0.1, "log": True},
        "stage2.lr_mult_heads": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
    }
    raw["num_samples"] = 2
    raw["max_concurrent_trials"] = 2
    raw["scheduler"] = {"type": "fifo"}
    space = parse_space(raw)
    results = dtlray.build_tuner(space, storage_path=str(tmp_path), name="rep").fit()
    assert results.num_errors == 0, [r.error for r in results]
    exp = Path(results.experiment_path)
    assert (exp / SPACE_FILE).is_file()  # the report reads the searched ranges from it
    summarize_best(results, space, results.experiment_path)
    best = json.loads((exp / "best.json").read_text())

    assert main_args([str(exp), "--baseline"]) == 0

    out = exp / "report"
    for name in PLOTS:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width >= 600
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert f"**{best['trial_id']}**" in md
    assert "no `space.json`" not in md
    assert "<table>" in html and 'src="history.png"' in html

    # The baseline: the best config from scratch at the epochs the best trial ran.
    baseline = json.loads((exp / BASELINE_DIR / BASELINE_FILE).read_text())
    assert baseline["config"]["stage2"]["init"] == "scratch"
    assert baseline["config"]["stage2"]["epochs"] == best["epochs"] == 2
    assert baseline["config"]["stage2"]["lr"] == best["config"]["stage2"]["lr"]
    for target in ("digits", "faces"):
        assert 0.0 <= baseline["metrics"][f"target/{target}/test_acc"] <= 1.0

    # The gain table has numbers: finetuned, scratch, gain, its 95% CI and the verdict per
    # target and the mean, from per-image predictions of both models on the same test images.
    predictions = json.loads((exp / PREDICTIONS_FILE).read_text())
    assert predictions["trial_id"] == best["trial_id"]
    for target in ("digits", "faces"):
        scored = predictions["tasks"][target]
        right = sum(a == b for a, b in zip(scored["label"], scored["pred"], strict=True))
        assert right / len(scored["label"]) == pytest.approx(
            best["test"][f"target/{target}/test_acc"]
        )
        assert baseline["runs"][0]["predictions"][target]["label"] == scored["label"]
    section = md.split("## Transfer gain\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line[:2] == "| "]
    assert [r[0].strip() for r in rows[2:]] == ["digits", "faces", "**mean**"]
    stored = json.loads((exp / "best.json").read_text())["transfer"]
    for row in rows[2:]:
        finetuned, scratch, gain = (float(c) for c in row[1:4])
        assert abs((finetuned - scratch) * 100 - gain) <= 0.1  # shown rounded
        low, high = (float(x) for x in row[4].split(" to "))
        assert low - 0.05 <= gain <= high + 0.05
        verdict = row[5].strip().strip("*")
        assert verdict == ("positive transfer" if low > 0 else "negative transfer" if high < 0
                           else "no significant difference")  # fmt: skip
        name = row[0].strip().strip("*")
        entry = stored["mean"] if name == "mean" else stored["targets"][name]
        assert entry["verdict"] == verdict
    assert "matched epochs (2 finetune epoch(s) each)" in section
    assert "1 trial(s) pretrained stage 1" in md and "1 reused a stored stage 1" in md

    # A second report reuses the stored baseline instead of training it again.
    runs = sorted(p.name for p in (exp / BASELINE_DIR).iterdir() if p.is_dir())
    assert main_args([str(exp), "--baseline"]) == 0
    assert sorted(p.name for p in (exp / BASELINE_DIR).iterdir() if p.is_dir()) == runs
    assert json.loads((exp / BASELINE_DIR / BASELINE_FILE).read_text()) == baseline

    # More seeds: only the missing one trains; the first run is kept as it was.
    assert main_args([str(exp), "--baseline-seeds", "2"]) == 0
    two = json.loads((exp / BASELINE_DIR / BASELINE_FILE).read_text())
    assert [r["seed"] for r in two["runs"]] == [0, 1]
    assert two["runs"][0] == baseline["runs"][0]
    assert two["runs"][1]["predictions"]["faces"]["label"] == predictions["tasks"]["faces"]["label"]
    md = (out / "report.md").read_text()
    assert "from scratch (test acc, mean of 2 seeds)" in md
    assert json.loads((exp / "best.json").read_text())["transfer"]["baseline_seeds"] == 2
