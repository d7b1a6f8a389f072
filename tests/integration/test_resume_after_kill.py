"""A trial whose training process is killed mid-finetune resumes from its last checkpoint and
finishes: a one-worker search trial (the loop runs in the Tune trial; Tune retries it) and a
``TorchTrainer`` worker (``dtlray train``; Train restarts its worker group)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # starts a real local Ray

TINY = Path("search_spaces/tiny.yaml")
EPOCHS = 6  # with the larger label budget below: 1-20 s each (by CPU), time to kill mid-run
KILL_AFTER = 2  # the epoch whose line triggers the kill: EPOCHS - KILL_AFTER epochs still to run


def _kill_after_epoch(cmd: list[str], process: str, epoch: int) -> tuple[int, str]:
    """Run ``cmd``; SIGKILL the Ray process named ``process`` once it printed finetune epoch
    ``epoch``; return the exit code and the whole output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert run.stdout is not None
    line_of = re.compile(rf"\({process} pid=(\d+)\).*\[dtlray\] finetune epoch {epoch}/{EPOCHS}")
    lines, killed = [], False
    deadline = time.monotonic() + 600
    for line in run.stdout:
        lines.append(line)
        match = line_of.search(line)
        if match and not killed:
            time.sleep(1.5)  # let the epoch's checkpoint reach storage (see RAY_NOTES)
            os.kill(int(match.group(1)), signal.SIGKILL)
            killed = True
        assert time.monotonic() < deadline, "".join(lines[-50:])
    run.wait(timeout=300)
    out = "".join(lines)
    assert killed, f"never saw epoch {epoch} of {process}:\n{out[-3000:]}"
    return run.returncode, out


def _space(tmp_path: Path, data_root: Path) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    raw["trial"]["stage2"]["epochs"] = EPOCHS
    raw["trial"]["stage2"]["samples_per_class"] = 100
    # Short epochs: the default (auto) would not checkpoint before the end; resuming from the
    # last checkpoint is what is tested here.
    raw["trial"]["resources"]["checkpoint"] = "every_epoch"
    raw["num_samples"] = 1
    raw["scheduler"] = {"type": "fifo"}
    raw["search"] = {"stage2.lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True}}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    return space


def test_a_killed_one_worker_search_trial_resumes(data_root: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "dtlray", "tune", str(_space(tmp_path, data_root))]
    cmd += ["--storage-path", str(storage), "--name", "killed"]
    code, out = _kill_after_epoch(cmd, "run_trial_fn", epoch=KILL_AFTER)
    assert code == 0, out[-3000:]
    assert "[dtlray] resuming finetune at epoch" in out, out[-5000:]
    (result,) = (storage / "killed").glob("run_trial_fn_*/result.json")
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    assert rows[-1]["epoch"] == EPOCHS
    # Resumed, not restarted: no epoch before the kill was trained twice from scratch.
    assert [r["epoch"] for r in rows].count(1) == 1
    best = json.loads((storage / "killed" / "best.json").read_text())
    assert best["epochs"] >= EPOCHS and "target/test_acc" in best["test"]


def test_a_killed_train_worker_resumes(data_root: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dtlray", "train", str(_space(tmp_path, data_root))]
    cmd += ["--storage-path", str(tmp_path / "runs"), "--name", "killed-train"]
    code, out = _kill_after_epoch(cmd, "RayTrainWorker", epoch=KILL_AFTER)
    assert code == 0, out[-3000:]
    assert "[dtlray] resuming finetune at epoch" in out, out[-5000:]
    assert f"finetune epoch {EPOCHS}/{EPOCHS}" in out
    assert "target/test_acc" in out.split("final metrics:", 1)[1]
