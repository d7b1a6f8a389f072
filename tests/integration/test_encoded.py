"""Trials on datasets stored as PNG and JPEG: Ray Data decodes and resizes them ahead of the
workers, under DDP and streaming too; a dataset whose rows are not what it records is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dtlray.cli import main
from dtlray.config import TrialConfig
from dtlray.data import load_info, prepare_builtin
from dtlray.data.layout import ShardInfo, compute_fingerprint
from dtlray.search_space import load_space
from dtlray.trial import plan_trial
from tests.conftest import DATA_ROOT_LIMIT, one_error_line

pytestmark = pytest.mark.slow  # starts a real local Ray

TINY = "search_spaces/tiny.yaml"
FORMATS = {"fashion-mnist": "jpeg", "digits": "png", "faces": "jpeg"}


@pytest.fixture(scope="module")
def encoded_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.yaml's datasets stored encoded: the source and faces as JPEG, digits as PNG."""
    root = tmp_path_factory.mktemp("encoded-data")
    for name, image_format in FORMATS.items():
        prepare_builtin(name, root, limit=DATA_ROOT_LIMIT, image_format=image_format)
    return root


def _final_metrics(output: str) -> dict[str, str]:
    block = output.split("final metrics:", 1)[1].split("results:", 1)[0]
    return dict(line.split() for line in block.strip().splitlines())


def test_workers_receive_rows_decoded_to_the_model_size(
    ray_cluster: None, encoded_root: Path, tmp_path: Path
) -> None:
    cfg = TrialConfig.from_flat(
        {"data.root": str(encoded_root)}, base=load_space(TINY).trial_config()
    )
    trial = plan_trial(cfg, storage_path=str(tmp_path))
    size = cfg.data.image_size
    # Every dataset arrives at the model's input size, with its stored channels.
    assert {n: m.image_shape for n, m in trial.plan.datasets.items()} == {
        "digits": (size, size, 1),
        "faces": (size, size, 1),
        "fashion-mnist": (size, size, 1),
    }
    batch = next(iter(trial.datasets["finetune.faces.val"].iter_batches(batch_format="pyarrow")))
    lengths = {len(row.as_py()) for row in batch["image"]}
    assert lengths == {size * size}  # raw uint8 rows, not JPEG files


def test_train_two_workers_streaming_encoded_datasets(
    ray_cluster: None, encoded_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", TINY, "--storage-path", str(tmp_path), "--name", "encoded"]
    args += ["--set", f"data.root={encoded_root}", "--set", "resources.num_workers=2"]
    args += ["--set", "data.in_memory_max_mb=0"]  # Ray Data decodes every epoch's stream
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "streams from Ray Data every epoch" in out
    metrics = _final_metrics(out)
    # faces is two classes of 30 test images: a trunk that saw garbage would sit near 0.5.
    assert float(metrics["target/faces/test_acc"]) >= 0.7, metrics
    assert 0.0 < float(metrics["target/digits/test_acc"]) <= 1.0


def test_rows_that_are_not_the_recorded_format_are_refused(
    ray_cluster: None,
    encoded_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "data"
    for name in FORMATS:
        shutil.copytree(encoded_root / name, root / name)
    info_file = root / "faces" / "dataset.json"
    raw = json.loads(info_file.read_text())
    raw["image_format"] = "png"  # the files are JPEG; a consistent fingerprint, a wrong claim
    files = {split: tuple(ShardInfo(**s) for s in shards) for split, shards in raw["files"].items()}
    raw["fingerprint"] = compute_fingerprint(
        tuple(raw["classes"]), tuple(raw["image_shape"]), files, "png"
    )
    info_file.write_text(json.dumps(raw))
    assert load_info("faces", root).image_format == "png"

    args = ["train", TINY, "--storage-path", str(tmp_path / "runs"), "--set", f"data.root={root}"]
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "png" in err.lower() and "jpeg" in err.lower() and "faces --force" in err, err
