"""The whole user path on object storage, against a real S3-protocol server on loopback.

``dtlray data prepare`` -> ``data list`` -> ``dtlray train`` -> a 2-trial ``dtlray tune`` ->
``dtlray report``, each as a user runs it (a subprocess with an embedded local Ray), with the
data root, the results and the stage-1 cache all on ``s3://``. ``HOME`` points at an empty
directory, so nothing can fall back to a local data root unseen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.conftest import DATA_ROOT_LIMIT, S3Server

pytestmark = pytest.mark.slow  # starts real local Rays

TINY = "search_spaces/tiny.yaml"


def test_prepare_train_tune_report_all_on_s3(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket("end-to-end")
    data, runs = f"{bucket}/data", f"{bucket}/runs"
    home = tmp_path / "home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(s3_env.env, HOME=str(home), DTLRAY_DATA=data)

    def dtlray(*args: str, timeout: int = 600) -> str:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "dtlray", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"dtlray {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        print(f"dtlray {args[0]}: {time.monotonic() - start:.0f} s")
        return done.stdout

    limit = str(DATA_ROOT_LIMIT)
    for name in ("fashion-mnist", "digits", "faces"):
        out = dtlray("data", "prepare", name, "--root", data, "--limit", limit)
        assert out.startswith(f"prepared {name}") and f"in {data}/{name}" in out, out
    listing = dtlray("data", "list")  # $DTLRAY_DATA
    assert f"datasets in {data}:" in listing
    assert all(name in listing for name in ("fashion-mnist", "digits", "faces")), listing

    # Streamed: Ray Data's read tasks (Ray workers, not this driver) read the source's shards
    # from S3 every epoch.
    out = dtlray(
        "train", TINY, "--storage-path", runs, "--name", "one", "--set", "data.in_memory_max_mb=0"
    )
    assert "pretrain streams from Ray Data every epoch" in out, out
    final = out.split("final metrics:", 1)[1]
    test_acc = float(final.split("target/test_acc", 1)[1].split()[0])
    assert 0.0 < test_acc <= 1.0
    assert f"results: {runs}/one" in out

    out = dtlray("tune", TINY, "--storage-path", runs, "--name", "search", "--num-samples", "2")
    assert f"best.json and results: {runs}/search" in out, out
    fs, inner = pafs.FileSystem.from_uri(runs)
    with fs.open_input_stream(f"{inner}/search/best.json") as handle:
        best = json.loads(handle.read())
    assert 0.0 < best["val"]["target/val_acc"] <= 1.0, best["val"]
    # The search reused the stage 1 that `train` stored in the cache on S3 (same config).
    assert best["stage1"]["hits"] == 2 and best["stage1"]["misses"] == 0, best["stage1"]
    cached = fs.get_file_info(pafs.FileSelector(f"{inner}/_stage1", recursive=True))
    stored = sorted(i.path.split("/_stage1/")[1] for i in cached if i.base_name.endswith(".pt"))
    # The result, and the end of its wsd constant phase (what a longer budget would continue).
    assert len(stored) == 2 and stored[0].endswith("/trunk.pt"), stored
    assert stored[1].startswith("tree-") and stored[1].endswith("/trunk.pt"), stored

    out = dtlray("report", f"{runs}/search")
    assert f"report: {runs}/search/report/report.html" in out, out
    with fs.open_input_stream(f"{inner}/search/report/report.md") as handle:
        assert "search" in handle.read().decode()

    assert not (home / ".cache" / "dtlray" / "data").exists()  # no local data root was made
