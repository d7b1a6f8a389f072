"""Evaluate a finetune checkpoint on a split (the chosen trial's test accuracy).

A search picks its best trial on validation accuracy only; the test splits are read once, here,
for that trial. The checkpoint carries the config that built it, so it rebuilds its own model.
"""

from __future__ import annotations

import io
import json

import torch

from dtlray.checkpoints import CHECKPOINT_FILE, CHECKPOINT_META
from dtlray.config import TrialConfig
from dtlray.stages import build_model, finetune_stage
from dtlray.storage import filesystem
from dtlray.train_loop import evaluate
from dtlray.trial_data import ensure_dataset, metas_for, split_dataset
from dtlray.worker import WorkerEnv, read_shard


def evaluate_checkpoint(
    checkpoint_path: str, split: str = "test"
) -> tuple[dict[str, float], dict[str, dict[str, list[int]]]]:
    """Accuracy of a finetune checkpoint on ``split`` of every target, and its predictions.

    Returns:
        ``(metrics, predictions)``: ``{"target/<task>/<split>_acc": ..., "target/<split>_acc":
        mean over tasks}`` and ``{task: {"label": [...], "pred": [...]}}`` in the split's row
        order (what a paired comparison with another model on the same images needs).
    """
    fs, root = filesystem(checkpoint_path)
    with fs.open_input_stream(f"{root}/{CHECKPOINT_META}") as f:
        meta = json.loads(f.read())
    with fs.open_input_stream(f"{root}/{CHECKPOINT_FILE}") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
    cfg = TrialConfig.from_dict(meta["config"])
    infos = {name: ensure_dataset(name, cfg.data.root) for name in cfg.data.targets}
    image_size = cfg.data.image_size  # encoded rows are decoded to it, as in the trial
    spec = finetune_stage(cfg, metas_for(infos, image_size))
    model = build_model(cfg, spec.heads, load_weights=False)  # the checkpoint has them all
    model.load_state_dict(state["model"])
    env = WorkerEnv(
        rank=0,
        world_size=1,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        seed=cfg.seed,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        channels_last=cfg.resources.channels_last,  # the layout it trained in
    )
    model.to(env.device, memory_format=env.memory_format)
    data = {}
    for task in spec.tasks:
        rows = split_dataset(infos[task.name], split, in_process=True, image_size=image_size)
        data[task.name] = read_shard(rows, task.meta)
    predicted: dict[str, torch.Tensor] = {}
    results = evaluate(model, spec.tasks, data, env, predictions=predicted)
    metrics = {f"target/{name}/{split}_acc": acc for name, (acc, _) in results.items()}
    metrics[f"target/{split}_acc"] = sum(acc for acc, _ in results.values()) / len(results)
    predictions = {
        name: {"label": data[name].labels.tolist(), "pred": predicted[name].tolist()}
        for name in results
    }
    return metrics, predictions
