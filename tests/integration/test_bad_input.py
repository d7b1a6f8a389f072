"""Bad input to ``dtlray check`` / ``dtlray tune`` fails in one line, before trials start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

TINY = Path("search_spaces/tiny.yaml")


def _dtlray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "dtlray", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dtlray: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_an_empty_space_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for command in ("check", "tune", "train"):
        line = _error_line(_dtlray(command, str(empty)))
        assert "the file is empty" in line and "search_spaces/tiny.yaml" in line


def test_a_space_that_searches_nothing_is_refused_by_check_and_tune(tmp_path: Path) -> None:
    raw = yaml.safe_load(TINY.read_text())
    del raw["search"]
    space = tmp_path / "fixed.yaml"
    space.write_text(yaml.safe_dump(raw))
    for command in ("check", "tune"):
        line = _error_line(_dtlray(command, str(space)))
        assert "nothing is searched" in line and "dtlray train" in line


def test_tune_on_a_dataset_never_prepared_fails_before_ray(tmp_path: Path) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["trial"]["data"]["root"] = str(tmp_path / "data")
    raw["trial"]["data"]["targets"] = ["digits", "my-photos"]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    result = _dtlray("tune", str(space), "--storage-path", str(tmp_path / "runs"))
    line = _error_line(result)
    assert "my-photos" in line and "dtlray data prepare" in line
    assert "Ray dashboard" not in result.stdout  # failed before Ray started
    assert not (tmp_path / "runs").exists()


def test_an_address_nothing_answers_fails_within_30_s(tmp_path: Path) -> None:
    start = time.monotonic()
    result = _dtlray(
        "tune", str(TINY), "--address", "127.0.0.1:1", "--storage-path", str(tmp_path), timeout=60
    )
    line = _error_line(result)
    assert time.monotonic() - start < 30
    assert "127.0.0.1:1" in line and "ray start --head" in line and "drop --address" in line
