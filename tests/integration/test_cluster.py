"""The cluster deployment: cluster.yaml checked offline, and the cluster launcher run for real.

``cluster.yaml`` (AWS) and ``cluster-local.yaml`` (Ray's local provider) go through the same
validation ``ray up`` does first (``prepare_config`` then ``validate_config``; neither needs
boto3). ``scripts/cluster_smoke`` then ``ray up``s the local-provider cluster on this host (head
127.0.0.2, worker 127.0.0.3, each reached over SSH), ``ray submit``s a tiny search to it and
``ray down``s it; the test checks the search's results and that nothing of the cluster is left.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dtlray.report.records import read_jsonl

pytestmark = pytest.mark.slow  # starts a real local Ray

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "scripts" / "cluster_smoke"
CANNOT_RUN = 77  # scripts/cluster_smoke's exit status when this machine cannot run it


def _load(name: str, fill: dict[str, str] | None = None) -> dict[str, Any]:
    text = (REPO / name).read_text()
    for key, value in (fill or {}).items():
        text = text.replace(f"@{key}@", value)
    return yaml.safe_load(text)


def _validated(cfg: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


LOCAL_FILL = {
    "CLUSTER_NAME": "dtlray-test",
    "SSH_USER": "root",
    "SSH_KEY": "/tmp/key",
    "REPO": str(REPO) + "/",
    "DATA_ROOT": "/tmp/data",
    "GCS_PORT": "40001",
    "DASHBOARD_PORT": "40002",
    "CLIENT_PORT": "40003",
    "HEAD_AGENT_PORT": "40004",
    "WORKER_AGENT_PORT": "40005",
}


def test_aws_cluster_config_passes_rays_validation() -> None:
    cfg = _validated(_load("cluster.yaml"))

    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head["resources"].get("GPU", 0) == 0
    (worker,) = (t for name, t in cfg["available_node_types"].items() if name != "head.cpu")
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert (worker["min_workers"], worker["max_workers"]) == (0, 8)
    assert worker["resources"]["GPU"] == 1
    assert cfg["file_mounts"]["~/dtlray"] == "."
    setup = " ".join(cfg["head_setup_commands"])
    assert "pip install -q -e ~/dtlray" in setup and "boto3" in setup
    assert "DTLRAY_DATA=" in setup


def test_local_cluster_template_passes_rays_validation() -> None:
    cfg = _validated(_load("cluster-local.yaml", LOCAL_FILL))

    assert cfg["provider"] == {
        "type": "local",
        "head_ip": "127.0.0.2",
        "worker_ips": ["127.0.0.3"],
    }
    assert cfg["available_node_types"]["local.cluster.node"]["max_workers"] == 1
    # Everything the smoke fills in is a placeholder of the template, and nothing else is.
    placeholders = set(re.findall(r"@([A-Z_]+)@", (REPO / "cluster-local.yaml").read_text()))
    assert placeholders == set(LOCAL_FILL)


def test_validation_rejects_an_unknown_key() -> None:
    """The check above can fail: Ray's schema refuses a misspelt key."""
    cfg = _load("cluster.yaml")
    cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        _validated(cfg)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_every_key_is_commented(name: str) -> None:
    """Each key has a comment on its line or on the line just above it (what and why)."""
    path = REPO / name
    lines = path.read_text().splitlines()
    uncommented = []

    def visit(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                line = key.start_mark.line
                above = lines[line - 1].strip() if line else ""
                if "#" not in lines[line] and not above.startswith("#"):
                    uncommented.append(f"{name}:{line + 1}: {lines[line].strip()}")
                visit(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                visit(item)

    visit(yaml.compose(path.read_text()))
    assert not uncommented, "keys without a comment:\n" + "\n".join(uncommented)


@pytest.mark.slow
def test_ray_up_submit_down_on_a_local_cluster(data_root: Path, tmp_path: Path) -> None:
    """`ray up`, `ray submit` a tiny search, `ray down`, for real (2-3 minutes on 2 idle cores)."""
    storage = tmp_path / "results"
    proc = subprocess.Popen(
        [str(SMOKE), "--data-root", str(data_root), "--storage-path", str(storage)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        # Like Ctrl-C: stop its whole process group, so that its cleanup (ray down, sshd) runs.
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
        pytest.fail("scripts/cluster_smoke took over 25 minutes:\n" + output[-6000:])
    if proc.returncode == CANNOT_RUN:
        reason = output.strip().splitlines()[-1]
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the cluster smoke test, but: {reason}")
        pytest.skip(reason)
    assert proc.returncode == 0, output[-6000:]

    assert "best trial" in output
    best = json.loads((storage / "smoke" / "best.json").read_text())
    assert best["objective"]["metric"] == "target/val_acc"
    assert 0.0 <= best["objective"]["value"] <= 1.0
    # The worker node trained: a one-worker trial trains in its own Tune trial process, and Tune
    # records each result's node. (Not from the console: Ray's log deduplication may print a
    # line of the worker node's without its "ip=" prefix.)
    nodes = {
        row["node_ip"]
        for path in (storage / "smoke").glob("run_trial_fn_*/result.json")
        for row in read_jsonl(path)
        if row.get("training_iteration", 0) >= 1
    }
    assert "127.0.0.3" in nodes, (nodes, output[-6000:])

    # Tidied up: the run directory is gone, and no process of the cluster or its sshd is left.
    started = re.search(r"run directory (/tmp/dtlc\.\w+); .* GCS at (127\.0\.0\.2:\d+)", output)
    assert started, output[:2000]
    run_dir, gcs_address = started.groups()
    assert not Path(run_dir).exists()
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert run_dir not in processes and gcs_address not in processes
