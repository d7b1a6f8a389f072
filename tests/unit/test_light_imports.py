"""Validating a space and the ``dtlray data`` commands import neither torch nor Ray.

Each check runs in a fresh interpreter, since this one has imported torch for other tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "ray")

# Printed last by every snippet: the heavy modules the code above it imported.
_REPORT = f"""
import sys
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""


def _imported_heavy_modules(code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code + _REPORT, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_report_sees_an_import() -> None:
    # Guards the two tests below against passing because the report never sees anything.
    assert _imported_heavy_modules("import torch") == "['torch']"


def test_config_and_search_space_validation() -> None:
    code = """
import sys
import dtlray.config, dtlray.search_space
space = dtlray.search_space.load_space(sys.argv[1])
space.trial_config()
dtlray.config.TrialConfig.from_flat({"model.backbone": "vgg11_bn", "data.image_size": 48})
"""
    assert _imported_heavy_modules(code, "search_spaces/tiny.yaml") == "[]"


@pytest.mark.parametrize("with_dataset", [False, True])
def test_data_prepare_and_list(tmp_path: Path, with_dataset: bool) -> None:
    # The dtlray.data.cli handlers, parsed the way `dtlray data ...` parses them.
    code = """
import argparse, sys
from dtlray.data import cli
parser = argparse.ArgumentParser()
cli.add_parser(parser.add_subparsers())
commands = [["prepare", "digits"]] if sys.argv[2] == "prepare" else []
for command in [*commands, ["list"]]:
    args = parser.parse_args(["data", *command, "--root", sys.argv[1]])
    assert args.handler(args) == 0
"""
    step = "prepare" if with_dataset else "list"
    assert _imported_heavy_modules(code, str(tmp_path), step) == "[]"
    assert (tmp_path / "digits" / "dataset.json").is_file() == with_dataset


@pytest.mark.parametrize(
    "argv", [["--help"], ["check", "search_spaces/tiny.yaml"], ["tune", "--help"]]
)
def test_light_cli_commands(argv: list[str]) -> None:
    # The CLI as `dtlray ...` runs it: parser construction and the command itself.
    code = """
import sys
from dtlray.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:  # --help exits 0
    assert done.code == 0, done.code
"""
    assert _imported_heavy_modules(code, *argv) == "[]"
