"""Pieces of the trial that need no Ray: optimiser groups, schedules, label budgets, stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtlray.config import TrialConfig
from dtlray.models import build_transfer_model
from dtlray.stages import DatasetMeta, dataset_key, finetune_stage, pretrain_stage
from dtlray.train_loop import build_optimizer, build_scheduler
from dtlray.trial_data import select_label_budget

METAS = {
    "fashion-mnist": DatasetMeta("fashion-mnist", 10, (28, 28, 1)),
    "digits": DatasetMeta("digits", 10, (8, 8, 1)),
    "faces": DatasetMeta("faces", 2, (25, 25, 1)),
}


def _model(cfg: TrialConfig, heads: dict[str, int]):
    torch.manual_seed(0)
    return build_transfer_model(
        backbone=cfg.model.backbone,
        in_channels=cfg.data.channels,
        small_input=cfg.small_input,
        weights=None,
        fusion_depth=cfg.model.fusion_depth,
        fusion_width=cfg.model.fusion_width,
        heads=heads,
    )


def test_finetune_groups_get_lr_times_multiplier() -> None:
    cfg = TrialConfig.from_flat(
        {
            "stage2.lr": 0.02,
            "stage2.lr_mult_backbone": 0.1,
            "stage2.lr_mult_fusion": 0.5,
            "stage2.lr_mult_heads": 3.0,
            "model.fusion_depth": 2,
            "model.fusion_width": 16,
        }
    )
    spec = finetune_stage(cfg, METAS)
    model = _model(cfg, spec.heads)
    optimizer = build_optimizer(model, spec)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 0.002, "fusion": 0.01, "heads": 0.06})
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    # Every parameter is in exactly one group.
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_pretrain_uses_one_lr_and_a_source_head() -> None:
    cfg = TrialConfig.from_flat({"stage1.lr": 0.07, "stage2.lr_mult_backbone": 0.1})
    spec = pretrain_stage(cfg, METAS)
    assert spec.heads == {"fashion-mnist": 10}
    (task,) = spec.tasks
    assert task.test_key is None  # the source is never tested
    assert spec.train_keys() == [dataset_key("pretrain", "fashion-mnist", "train")]
    optimizer = build_optimizer(_model(cfg, spec.heads), spec)
    assert {g["lr"] for g in optimizer.param_groups} == {0.07}


def test_finetune_has_one_head_per_target() -> None:
    spec = finetune_stage(TrialConfig(), METAS)
    assert spec.heads == {"digits": 10, "faces": 2}
    keys = [key for t in spec.tasks for key in (t.train_key, t.val_key, t.test_key)]
    # The trial names its datasets with dataset_key; the loop reads them by the task's keys.
    assert keys == [
        dataset_key("finetune", name, split)
        for name in ("digits", "faces")
        for split in ("train", "val", "test")
    ]
    assert len(set(keys)) == 6
    assert all("/" not in key for key in keys)  # Ray Data uses them in log file paths
    assert spec.train_keys() == keys[::3]


@pytest.mark.parametrize(("schedule", "last_lr"), [("constant", 0.1), ("cosine", 0.0)])
def test_schedules(schedule: str, last_lr: float) -> None:
    cfg = TrialConfig.from_flat({"stage2.lr": 0.1, "stage2.schedule": schedule})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg.stage2)
    for _ in range(cfg.stage2.epochs):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(last_lr, abs=1e-9)


def test_label_budget_is_stratified_seeded_and_keeps_every_class() -> None:
    labels = np.repeat(np.arange(5), [50, 40, 30, 3, 1])
    keep = select_label_budget(labels, samples_per_class=10, fraction=None, seed=0)
    counts = np.bincount(labels[keep], minlength=5)
    assert counts.tolist() == [10, 10, 10, 3, 1]
    assert np.array_equal(keep, select_label_budget(labels, 10, None, seed=0))
    assert not np.array_equal(keep, select_label_budget(labels, 10, None, seed=1))
    frac = select_label_budget(labels, None, 0.1, seed=0)
    assert np.bincount(labels[frac], minlength=5).tolist() == [5, 4, 3, 1, 1]
    assert len(select_label_budget(labels, None, None, seed=0)) == len(labels)


def _faces_epoch(**flat: object):
    """A tiny one-task finetune: its config, stage, and 32 random 25x25 faces-shaped images."""
    from dtlray.worker import InMemorySplit

    cfg = TrialConfig.from_flat(
        {
            "stage2.batch_size": 8,
            "model.fusion_width": 16,
            "data.image_size": 16,
            "data.channels": 1,
            "data.targets": ["faces"],
            **flat,
        }
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 25, 25), dtype=torch.uint8, generator=generator)
    data = {"faces": InMemorySplit(images, torch.randint(0, 2, (32,), generator=generator))}
    return cfg, finetune_stage(cfg, METAS), data


def test_a_non_finite_loss_ends_the_epoch_as_diverged() -> None:
    from dtlray.train_loop import Diverged, train_one_epoch
    from dtlray.worker import WorkerEnv

    cfg, spec, data = _faces_epoch(**{"stage2.lr": 10.0})
    model = _model(cfg, spec.heads)
    env = WorkerEnv(0, 1, torch.device("cpu"), 0, image_size=16, channels=1)
    # A model whose weights are already non-finite: the first step's loss is NaN.
    with torch.no_grad():
        next(iter(model.heads.parameters())).fill_(float("nan"))
    with pytest.raises(Diverged) as caught:
        train_one_epoch(model, model, spec, data, build_optimizer(model, spec), 0, env)
    err = caught.value
    assert (err.stage, err.epoch) == ("finetune", 1)
    assert "step 1: the training loss is nan" in err.reason
    assert "lower the learning rate (stage2.lr=10, e.g. to 1)" in err.reason


def test_precision_resolves_per_device_and_fp16_needs_a_gpu() -> None:
    from dtlray.errors import DtlrayError
    from dtlray.worker import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == {"amp_dtype": None, "channels_last": True}
    assert resolve_precision("auto", cpu, channels_last=False)["channels_last"] is False
    assert resolve_precision("fp32", cpu)["amp_dtype"] is None
    assert resolve_precision("bf16", cpu)["amp_dtype"] == torch.bfloat16
    with pytest.raises(DtlrayError, match="fp16 needs a GPU.*use bf16 or fp32 on CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(Exception, match="resources.precision"):
        TrialConfig.from_flat({"resources.precision": "fp8"})


def test_bf16_epochs_train_on_cpu_and_checkpoints_resume_in_any_precision_and_layout() -> None:
    from dtlray.train_loop import train_one_epoch
    from dtlray.worker import WorkerEnv, resolve_precision

    cfg, spec, data = _faces_epoch()
    cpu = torch.device("cpu")

    def env(precision: str, channels_last: bool = True) -> WorkerEnv:
        return WorkerEnv(0, 1, cpu, 0, 16, 1, **resolve_precision(precision, cpu, channels_last))

    model = _model(cfg, spec.heads).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, spec)
    stats = train_one_epoch(model, model, spec, data, optimizer, 0, env("bf16"))
    assert np.isfinite(stats["train/loss"]) and stats["train/samples_per_s"] > 0
    # Weights stay fp32 under autocast: a bf16 checkpoint resumes in fp32, and back; a
    # channels_last one in NCHW, and back.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    resumed = _model(cfg, spec.heads)
    resumed.load_state_dict(state["model"])
    resumed_opt = build_optimizer(resumed, spec)
    resumed_opt.load_state_dict(state["optimizer"])
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        stats = train_one_epoch(
            resumed, resumed, spec, data, resumed_opt, 1, env(precision, channels_last)
        )
        assert np.isfinite(stats["train/loss"])


def test_a_channels_last_epoch_trains_as_an_nchw_one() -> None:
    from dtlray.train_loop import evaluate, train_one_epoch
    from dtlray.worker import WorkerEnv, resolve_precision

    cfg, spec, data = _faces_epoch()
    cpu = torch.device("cpu")
    losses, evals = [], []
    for channels_last in (False, True):
        env = WorkerEnv(0, 1, cpu, 0, 16, 1, **resolve_precision("fp32", cpu, channels_last))
        model = _model(cfg, spec.heads)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        optimizer = build_optimizer(model, spec)
        torch.manual_seed(0)  # the same augmentation draws in both layouts
        losses.append(train_one_epoch(model, model, spec, data, optimizer, 0, env)["train/loss"])
        evals.append(evaluate(model, spec.tasks, data, env)["faces"][1])
    # Same weights, same batches: the layouts differ only in the kernels' rounding.
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert evals[1] == pytest.approx(evals[0], rel=1e-3)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("every_epoch", [1, 2, 3, 4, 5, 6]), ("end", [6]), ("auto", [2, 4, 6])],
)
def test_checkpoints_only_where_something_resumes_from_them(policy: str, expected: list) -> None:
    from dtlray.checkpoints import CHECKPOINT_INTERVAL_S, checkpoint_now
    from dtlray.worker import WorkerPlan

    cfg = TrialConfig.from_flat({"stage2.epochs": 6, "resources.checkpoint": policy})
    plan = WorkerPlan(datasets={}, stage1_mode="none", stage1_dir=None, checkpoint_epochs=(2, 4))
    assert [e for e in range(1, 7) if checkpoint_now(cfg, plan, e, 1.0)] == expected
    # auto also saves once a minute of training is unsaved (a restart would lose real work).
    assert checkpoint_now(cfg, plan, 3, CHECKPOINT_INTERVAL_S) == (policy != "end")
