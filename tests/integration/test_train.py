"""The two-stage trial on real Ray Train + Ray Data, on the real built-in datasets."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dtlray.cli import main
from dtlray.data import load_info
from dtlray.experiment import STAGE1_CACHE_DIR as CACHE_DIR
from dtlray.models import build_transfer_model
from dtlray.ray_session import EMBEDDED_RAY_ENV
from dtlray.stages import DatasetMeta, TaskSpec
from dtlray.train_loop import evaluate
from dtlray.trial_data import SplitTrainOnlyDataConfig, split_dataset
from dtlray.worker import WorkerEnv, read_shard
from tests.conftest import own_stderr

pytestmark = pytest.mark.slow  # starts a real local Ray

# Ray workers cannot import this test module: ship its worker functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = "search_spaces/tiny.yaml"
CONTRACT_METRICS = [
    "target/val_acc",
    "target/digits/val_acc",
    "target/faces/val_acc",
    "target/val_loss",
    "source/val_acc",
    "stage1/cache_hit",
    "stage1/seconds",
    "train/samples_per_s",
    "target/test_acc",
    "target/digits/test_acc",
    "target/faces/test_acc",
]


def _final_metrics(output: str) -> dict[str, str]:
    block = output.split("final metrics:", 1)[1].split("results:", 1)[0]
    return dict(line.split() for line in block.strip().splitlines())


def test_train_tiny_two_workers_reports_every_metric(
    ray_cluster: None, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", TINY, "--storage-path", str(tmp_path), "--name", "two-workers"]
    args += ["--set", f"data.root={data_root}", "--set", "resources.num_workers=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = _final_metrics(out)
    missing = [name for name in CONTRACT_METRICS if name not in metrics]
    assert not missing, f"missing metrics {missing} in:\n{out}"
    assert metrics["stage1/cache_hit"] == "False" and metrics["stage1/mode"] == "computed"
    assert 0.0 <= float(metrics["target/test_acc"]) <= 1.0
    assert float(metrics["val/epoch_seconds"]) > 0  # what validation costs an epoch
    # Stage 1 was stored for reuse (and its wsd constant phase, for a longer budget to
    # continue), and a finetune checkpoint rebuilds its own model.
    stored = sorted(p.name for p in (tmp_path / CACHE_DIR).iterdir())
    assert len(stored) == 2 and stored[1].startswith("tree-")
    checkpoints = sorted(p for p in (tmp_path / "two-workers").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "no finetune checkpoint written"
    meta = json.loads((checkpoints[-1] / "meta.json").read_text())
    assert meta["config"]["resources"]["num_workers"] == 2

    # Same stage-1 settings with another finetune LR: stage 1 is loaded, not recomputed.
    args = ["train", TINY, "--storage-path", str(tmp_path), "--name", "reuse"]
    args += ["--set", f"data.root={data_root}", "--set", "stage2.lr=0.05"]
    assert main(args) == 0
    metrics = _final_metrics(capsys.readouterr().out)
    assert metrics["stage1/cache_hit"] == "True" and metrics["stage1/mode"] == "reused"
    assert sorted(p.name for p in (tmp_path / CACHE_DIR).iterdir()) == stored


@pytest.mark.parametrize("backbone", ["vgg11_bn", "resnet18"])
def test_train_backbones_from_scratch_are_seeded(
    ray_cluster: None,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backbone: str,
) -> None:
    runs = []
    for name in ("a", "b"):
        args = ["train", TINY, "--storage-path", str(tmp_path), "--name", name]
        args += ["--set", f"data.root={data_root}", "--set", f"model.backbone={backbone}"]
        args += ["--set", "stage2.init=scratch", "--set", "stage2.epochs=1"]
        assert main(args) == 0
        runs.append(_final_metrics(capsys.readouterr().out))
    # No stage 1 in the scratch baseline, and no metric pretends there was one.
    assert runs[0]["stage1/mode"] == "scratch"
    assert "source/val_acc" not in runs[0] and "stage1/cache_hit" not in runs[0]
    for key in ("target/val_acc", "target/val_loss", "target/test_acc", "train/loss"):
        assert runs[0][key] == runs[1][key], key


def _eval_per_worker(config: dict) -> None:
    context = ray.train.get_context()
    env = WorkerEnv(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        seed=0,
        image_size=32,
        channels=1,
    )
    meta = DatasetMeta(**config["meta"])
    task = TaskSpec("digits", meta, "train", "val", None)
    torch.manual_seed(0)  # the same weights whatever the number of workers
    model = build_transfer_model(
        backbone="resnet18",
        in_channels=1,
        small_input=False,
        weights=None,
        fusion_depth=1,
        fusion_width=32,
        heads={"digits": meta.num_classes},
    )
    shard = read_shard(ray.train.get_dataset_shard("val"), meta)
    acc, loss = evaluate(model, (task,), {"digits": shard}, env)["digits"]
    seen = torch.tensor([len(shard)])
    if env.world_size > 1:
        dist.all_reduce(seen)
        everyone = [None] * env.world_size
        dist.all_gather_object(everyone, (acc, loss))
        assert len(set(everyone)) == 1, f"ranks disagree: {everyone}"
    # Train V2 keeps metrics with a checkpoint: attach an empty one from rank 0.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if env.rank == 0 else None
        ray.train.report({"acc": acc, "loss": loss, "seen": int(seen.item())}, checkpoint)


def _environment(names: list[str]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def test_the_embedded_rays_processes_get_dtlrays_settings(ray_cluster: None) -> None:
    # Set in the driver before ray.init (dtlray's value unless the user set one), so the raylet
    # and every worker it starts inherit them: Train's controller reads its health-check
    # interval in its own process.
    names = list(EMBEDDED_RAY_ENV)
    assert all(name in os.environ for name in names)
    env = ray.remote(num_cpus=0)(_environment)
    assert ray.get(env.remote(names)) == _environment(names)


def test_ddp_evaluation_counts_every_example_once(
    ray_cluster: None, data_root: Path, tmp_path: Path
) -> None:
    info = load_info("digits", data_root)
    meta = {"name": "digits", "num_classes": 10, "image_shape": list(info.image_shape)}
    results = {}
    for workers in (1, 2):
        trainer = ray.train.torch.TorchTrainer(
            _eval_per_worker,
            train_loop_config={"meta": meta},
            scaling_config=ray.train.ScalingConfig(num_workers=workers),
            datasets={"val": split_dataset(info, "val"), "train": split_dataset(info, "train")},
            dataset_config=SplitTrainOnlyDataConfig(train_keys=["train"]),
            run_config=ray.train.RunConfig(storage_path=str(tmp_path), name=f"eval-{workers}"),
        )
        results[workers] = trainer.fit().metrics
    assert results[1]["seen"] == results[2]["seen"] == info.splits["val"]
    assert results[1]["acc"] == results[2]["acc"]
    assert results[1]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)


def test_train_bad_override_is_one_clear_line(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", TINY, "--storage-path", str(tmp_path), "--set", "model.backbone=resnet9"]
    assert main(args) == 2
    err = own_stderr(capsys.readouterr().err)
    assert err.startswith("dtlray: error: invalid config: model.backbone: unknown backbone")
    assert "resnet18" in err and "Traceback" not in err
    assert main(["train", TINY, "--set", "stage2.lr"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["train", "no-such-space.yaml"]) == 2
    assert "not found" in capsys.readouterr().err
