"""The scratch baseline: the best configuration trained from scratch on the targets, on Ray Train.

``dtlray report --baseline`` trains it when the experiment has none for its best configuration;
the report then compares it with the finetuned best (the transfer gain). It is stored as
``<experiment>/baseline/result.json``: the configuration it was trained for, its epochs and its
final metrics. Importing this module is cheap: Ray and the trainer load when a baseline runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlray.errors import DtlrayError
from dtlray.experiment import ExperimentDir, write_json

if TYPE_CHECKING:
    from dtlray.config import TrialConfig

BASELINE_FILE = "result.json"


def baseline_file(experiment: Path) -> Path:
    """Where the experiment's scratch baseline is stored (``<experiment>/baseline/result.json``)."""
    return Path(ExperimentDir(str(experiment)).baseline_dir) / BASELINE_FILE


def run_baseline(
    experiment: Path,
    cfg: TrialConfig,
    trial_id: str,
    address: str | None = None,
    seeds: int = 1,
    stored: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the scratch baseline on Ray and store it as ``<experiment>/baseline/result.json``.

    One run per seed (``cfg.seed``, ``cfg.seed + 1``, ...: initialisation, batch order and the
    label-budget draw change); runs already in ``stored`` (a record for the same config) are
    kept, only the missing seeds train. Each run's final checkpoint predicts the test splits,
    so the report can compare it image by image with the finetuned best.

    Joins the Ray cluster at ``address`` (or the one already initialised, or starts an embedded
    local Ray, shut down afterwards). A Train run's name includes a hash of its config, so an
    interrupted baseline for the same config resumes from its last checkpoint.

    Args:
        experiment: the experiment directory.
        cfg: the configuration to train (``stage2.init: scratch``).
        trial_id: the trial whose configuration it is (names the Train run).
        address: Ray cluster address (default: the initialised Ray, else an embedded one).
        seeds: how many runs the record should hold.
        stored: the record stored so far for ``cfg``, if any (all its runs are kept).

    Returns:
        The stored record: ``trial_id``, ``config``, ``epochs``, ``metrics`` (the mean over
        runs of their finite final metrics), ``runs`` (``seed``, ``metrics``, ``run_path``,
        ``predictions`` of each) and ``created``.

    Raises:
        DtlrayError: a worker failed on bad input (e.g. a dataset that is no longer prepared).
    """
    import ray

    from dtlray.config import TrialConfig
    from dtlray.evaluate import evaluate_checkpoint
    from dtlray.ray_session import init_ray
    from dtlray.trial import build_trainer, run_trainer

    record = stored
    runs = list((stored or {}).get("runs", []))
    have = {run["seed"] for run in runs}
    todo = [cfg.seed + k for k in range(seeds) if cfg.seed + k not in have]
    started = not ray.is_initialized()
    if todo:
        init_ray(address)
    try:
        for seed in todo:
            run_cfg = TrialConfig.from_flat({"seed": seed}, base=cfg)
            digest = hashlib.sha256(
                json.dumps(run_cfg.to_dict(), sort_keys=True).encode()
            ).hexdigest()[:8]
            print(
                f"dtlray report: training the scratch baseline of trial {trial_id}, seed {seed} "
                f"({cfg.model.backbone}, {cfg.stage2.epochs} finetune epoch(s) on "
                f"{', '.join(cfg.data.targets)})",
                flush=True,
            )
            trainer, _ = build_trainer(
                run_cfg,
                storage_path=ExperimentDir(str(experiment)).baseline_dir,
                run_name=f"scratch-{trial_id}-{digest}",
                run_test=False,  # tested once below, from its checkpoint, image by image
            )
            result = run_trainer(trainer)
            if result.checkpoint is None:
                raise DtlrayError(f"the scratch baseline run {result.path} left no checkpoint")
            test, predictions = evaluate_checkpoint(result.checkpoint.path)
            metrics = {k: v for k, v in (result.metrics or {}).items() if _is_finite_number(v)}
            metrics.update(test)
            runs.append(
                {
                    "seed": seed,
                    "metrics": metrics,
                    "run_path": result.path,
                    "predictions": predictions,
                }
            )
            # Stored after every run: an interrupted --baseline-seeds keeps what it trained.
            record = _store(experiment, cfg, trial_id, runs)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    assert record is not None, "seeds >= 1 trains at least one run"
    return record


def _store(
    experiment: Path, cfg: TrialConfig, trial_id: str, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    keys = set.intersection(*(set(run["metrics"]) for run in runs)) if runs else set()
    record = {
        "trial_id": trial_id,
        "config": cfg.to_dict(),
        "epochs": cfg.stage2.epochs,
        "metrics": {k: sum(run["metrics"][k] for run in runs) / len(runs) for k in sorted(keys)},
        "runs": runs,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(str(baseline_file(experiment)), record)
    return record


def _is_finite_number(value: Any) -> bool:
    # What a comparison can use: bools, strings and NaN (e.g. a scratch run's source_val_acc) not.
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
