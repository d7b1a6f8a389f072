"""Finetune checkpoints: what one holds, when one is written, how a restart reads it back.

A checkpoint directory holds ``state.pt`` (model, optimizer, schedule, fp16's scaler; loaded
with ``weights_only=True``) and ``meta.json`` (the epoch, stage 1's outcome, the metrics and
the trial config, so it rebuilds its own model) — or, for a trial that diverged, only
``diverged.json``: the verdict a restart repeats instead of training again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from dtlray.config import TrialConfig
from dtlray.worker import WorkerPlan

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_META = "meta.json"
DIVERGED_FILE = "diverged.json"  # the checkpoint of a diverged trial holds only this
CHECKPOINT_INTERVAL_S = 60.0  # resources.checkpoint=auto: at most this much training unsaved


def checkpoint_now(cfg: TrialConfig, plan: WorkerPlan, epoch: int, unsaved_s: float) -> bool:
    """Whether finetune ``epoch`` (from 1) writes a checkpoint (only rank 0 writes one).

    A checkpoint costs a model + optimizer save (86 MB for a ResNet-18) and, on object storage,
    an upload; it is worth it only where something can resume from it: the end (the chosen
    trial's test evaluation reads it), a scheduler rung (a stopped trial's last report), or
    enough unsaved training that a restart would lose real work.
    """
    policy = cfg.resources.checkpoint
    if policy == "every_epoch" or epoch == cfg.stage2.epochs:
        return True
    if policy == "end":
        return False
    return epoch in plan.checkpoint_epochs or unsaved_s >= CHECKPOINT_INTERVAL_S


def write_checkpoint(
    directory: str, state: dict[str, Any], meta: dict[str, Any], cfg: TrialConfig
) -> None:
    """Write a finetune checkpoint (``state.pt`` + ``meta.json`` with the trial config)."""
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, CHECKPOINT_META), "w") as f:
        json.dump({**meta, "config": cfg.to_dict()}, f, indent=1)


def write_verdict(directory: str, metrics: dict[str, Any]) -> None:
    """Write a diverged trial's checkpoint: its last report, and no weights."""
    with open(os.path.join(directory, DIVERGED_FILE), "w") as f:
        json.dump(metrics, f, indent=1)


def diverged_report(checkpoint: Any) -> dict[str, Any] | None:
    """The metrics of a trial that diverged, when ``checkpoint`` is its verdict."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        verdict = os.path.join(path, DIVERGED_FILE)
        if not os.path.isfile(verdict):
            return None
        with open(verdict) as f:
            return json.load(f)


@dataclass
class Resume:
    """A state to continue from, loaded: a finetune checkpoint, or a stored stage-1 constant phase
    (``meta["step"]``: the optimizer steps it holds)."""

    model_state: dict[str, Any]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    meta: dict[str, Any]
    scaler_state: dict[str, Any] | None = None  # fp16 only
    rng: torch.Tensor | None = None  # torch's CPU generator (a stage-1 phase ending mid-epoch)


def load_resume(checkpoint: Any) -> Resume | None:
    """The finetune checkpoint to continue from (``weights_only=True``), or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        state = torch.load(os.path.join(path, CHECKPOINT_FILE), weights_only=True)
        with open(os.path.join(path, CHECKPOINT_META)) as f:
            meta = json.load(f)
    return Resume(state["model"], state["optimizer"], state["scheduler"], meta, state.get("scaler"))
