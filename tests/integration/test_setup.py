"""``scripts/setup``: the README's first command, with and without ``--dev``.

CI runs ``scripts/test``, which always passes ``--dev``; these tests run the plain path a
newcomer runs, and the ways it must fail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _setup(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/setup", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_plain_setup_the_readme_runs_succeeds() -> None:
    # The README's command: no --dev. (Here .venv exists with the dev tools, which satisfy it.)
    result = _setup()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "setup: ready" in result.stdout
    assert (REPO / ".venv/bin/dtlray").is_file()


def test_unknown_argument_is_refused() -> None:
    result = _setup("--devv")
    assert result.returncode == 2
    assert "unknown argument '--devv'" in result.stderr
    assert "usage: scripts/setup [--dev]" in result.stderr


def test_a_failing_pip_names_the_step(tmp_path: Path) -> None:
    # A copy of the repo whose .venv is a real venv without pip: the pip step fails for real.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts/setup", repo / "scripts/setup")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")], check=True)
    result = _setup(cwd=repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "setup: failed while upgrading pip in .venv" in result.stderr
    assert "run scripts/setup again" in result.stderr
    assert not (repo / ".venv/.dtlray-installed").exists()  # nothing claims to be installed
