"""What differs between pretraining and finetuning, described as data.

Both stages run through the same loop (:mod:`dtlray.train_loop`); a :class:`StageSpec` says which
tasks (datasets and heads) a stage trains, with which optimiser settings, per-group learning rate
multipliers and backbone freezing, and under which keys the trainer holds each task's splits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from dtlray.config import StageConfig, TrialConfig
from dtlray.models import TransferModel, build_transfer_model

StageName = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class DatasetMeta:
    """What a worker needs to know about a prepared dataset (from its ``dataset.json``)."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # stored (H, W, C)


@dataclass(frozen=True)
class TaskSpec:
    """One task: a dataset, its head, and the Ray Data dataset keys of its splits.

    ``test_key`` is None for a task that is never tested (the pretrain stage's source task).
    """

    name: str
    meta: DatasetMeta
    train_key: str
    val_key: str
    test_key: str | None


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline, as data."""

    name: StageName
    tasks: tuple[TaskSpec, ...]
    optim: StageConfig
    lr_mult: Mapping[str, float]
    freeze_backbone_epochs: int

    @property
    def heads(self) -> dict[str, int]:
        """Head name -> number of classes, for building or resetting the model's heads."""
        return {task.name: task.meta.num_classes for task in self.tasks}

    def train_keys(self) -> list[str]:
        """The dataset keys that are sharded across workers (the train splits)."""
        return [task.train_key for task in self.tasks]


def dataset_key(stage: StageName, dataset: str, split: str) -> str:
    """The name a split is given in the trainer's ``datasets`` dict."""
    # No "/": Ray Data uses the name in log file paths.
    return f"{stage}.{dataset}.{split}"


def _task(stage: StageName, meta: DatasetMeta, with_test: bool) -> TaskSpec:
    return TaskSpec(
        name=meta.name,
        meta=meta,
        train_key=dataset_key(stage, meta.name, "train"),
        val_key=dataset_key(stage, meta.name, "val"),
        test_key=dataset_key(stage, meta.name, "test") if with_test else None,
    )


def pretrain_stage(cfg: TrialConfig, datasets: Mapping[str, DatasetMeta]) -> StageSpec:
    """Stage 1: the source dataset, one head, every group at the stage-1 learning rate."""
    return StageSpec(
        name="pretrain",
        tasks=(_task("pretrain", datasets[cfg.data.source], with_test=False),),
        optim=cfg.stage1,
        lr_mult={"backbone": 1.0, "fusion": 1.0, "heads": 1.0},
        freeze_backbone_epochs=0,
    )


def finetune_stage(cfg: TrialConfig, datasets: Mapping[str, DatasetMeta]) -> StageSpec:
    """Stage 2: one task per target (each with a test split), per-group multipliers."""
    return StageSpec(
        name="finetune",
        tasks=tuple(_task("finetune", datasets[t], with_test=True) for t in cfg.data.targets),
        optim=cfg.stage2,
        lr_mult={group: cfg.stage2.lr_mult(group) for group in ("backbone", "fusion", "heads")},
        freeze_backbone_epochs=cfg.stage2.freeze_backbone_epochs,
    )


def build_model(
    cfg: TrialConfig, heads: Mapping[str, int], *, load_weights: bool = True
) -> TransferModel:
    """The trial's model with ``heads``; ``load_weights=False`` skips pretrained weights (for a
    checkpoint that holds every weight anyway)."""
    return build_transfer_model(
        backbone=cfg.model.backbone,
        in_channels=cfg.data.channels,
        small_input=cfg.small_input,
        weights=cfg.model.weights if load_weights else None,
        fusion_depth=cfg.model.fusion_depth,
        fusion_width=cfg.model.fusion_width,
        heads=heads,
        head_dropout=cfg.model.head_dropout,
        fusion_dropout=cfg.model.fusion_dropout,
    )
