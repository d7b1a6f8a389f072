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

from dtlray.experiment import ExperimentDir, write_json

if TYPE_CHECKING:
    from dtlray.config import TrialConfig

BASELINE_FILE = "result.json"


def baseline_file(experiment: Path) -> Path:
    """Where the experiment's scratch baseline is stored (``<experiment>/baseline/result.json``)."""
    return Path(ExperimentDir(str(experiment)).baseline_dir) / BASELINE_FILE


def run_baseline(
    experiment: Path, cfg: TrialConfig, trial_id: str, address: str | None = None
) -> dict[str, Any]:
    """Train the scratch baseline on Ray and store it as ``<experiment>/baseline/result.json``.

    Joins the Ray cluster at ``address`` (or the one already initialised, or starts an embedded
    local Ray, shut down afterwards). The Train run's name includes a hash of ``cfg``, so an
    interrupted baseline for the same config resumes from its last checkpoint.

    Args:
        experiment: the experiment directory.
        cfg: the configuration to train (``stage2.init: scratch``).
        trial_id: the trial whose configuration it is (names the Train run).
        address: Ray cluster address (default: the initialised Ray, else an embedded one).

    Returns:
        The stored record: ``trial_id``, ``config``, ``epochs``, ``metrics`` (the finite final
        ones), ``run_path`` and ``created``.

    Raises:
        DtlrayError: a worker failed on bad input (e.g. a dataset that is no longer prepared).
    """
    import ray

    from dtlray.ray_session import init_ray
    from dtlray.trial import build_trainer, run_trainer

    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    started = not ray.is_initialized()
    init_ray(address)
    print(
        f"dtlray report: training the scratch baseline of trial {trial_id} "
        f"({cfg.model.backbone}, {cfg.stage2.epochs} finetune epoch(s) on "
        f"{', '.join(cfg.data.targets)})",
        flush=True,
    )
    try:
        trainer, _ = build_trainer(
            cfg,
            storage_path=ExperimentDir(str(experiment)).baseline_dir,
            run_name=f"scratch-{trial_id}-{digest}",
            run_test=True,
        )
        result = run_trainer(trainer)
    finally:
        if started:
            ray.shutdown()
    metrics = {k: v for k, v in (result.metrics or {}).items() if _is_finite_number(v)}
    record = {
        "trial_id": trial_id,
        "config": cfg.to_dict(),
        "epochs": cfg.stage2.epochs,
        "metrics": metrics,
        "run_path": result.path,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(str(baseline_file(experiment)), record)
    return record


def _is_finite_number(value: Any) -> bool:
    # What a comparison can use: bools, strings and NaN (e.g. a scratch run's source_val_acc) not.
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
