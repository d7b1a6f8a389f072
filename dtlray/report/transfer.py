"""What stage 1 bought: its reuse across the search, and the transfer gain over the scratch
baseline (the best configuration trained from scratch, see :mod:`dtlray.baseline`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlray.baseline import BASELINE_FILE, baseline_file
from dtlray.errors import DtlrayError
from dtlray.experiment import BASELINE_DIR, BEST_FILE, read_json

if TYPE_CHECKING:
    from dtlray.config import TrialConfig
    from dtlray.report.records import TrialRecord


@dataclass(frozen=True)
class Stage1Summary:
    """How the search got its stage-1 results."""

    computed: int  # trials that pretrained
    reused: int  # trials that loaded a stored stage 1
    not_used: int  # scratch trials
    seconds_spent: float  # pretraining the computed ones cost
    seconds_saved: float  # pretraining the reused ones would have cost


def stage1_summary(trials: Sequence[TrialRecord]) -> Stage1Summary:
    """Counts and seconds from each trial's last report (as ``dtlray tune`` prints them)."""
    kinds = [(t.stage1, t.stage1_compute_seconds) for t in trials if t.stage1 is not None]
    return Stage1Summary(
        computed=sum(1 for kind, _ in kinds if kind == "computed"),
        reused=sum(1 for kind, _ in kinds if kind == "reused"),
        not_used=sum(1 for kind, _ in kinds if kind == "scratch"),
        seconds_spent=sum(s for kind, s in kinds if kind == "computed"),
        seconds_saved=sum(s for kind, s in kinds if kind == "reused"),
    )


@dataclass(frozen=True)
class GainRow:
    """One target's accuracy finetuned from stage 1 vs trained from scratch."""

    target: str
    finetuned: float
    scratch: float

    @property
    def gain_pp(self) -> float:
        """Finetuned minus scratch, in percentage points."""
        return (self.finetuned - self.scratch) * 100.0

    @property
    def negative(self) -> bool:
        """Negative transfer: stage 1 made this target worse than no pretraining."""
        return self.gain_pp < 0


def transfer_gain(
    targets: Sequence[str],
    finetuned: Mapping[str, float],
    scratch: Mapping[str, float],
    split: str = "test",
) -> list[GainRow]:
    """One row per target plus a final ``mean`` row (the mean over targets).

    Args:
        targets: the target dataset names.
        finetuned: metrics of the best config (``target/<task>/<split>_acc``).
        scratch: metrics of its scratch baseline, same keys.
        split: ``test`` or ``val``.

    Raises:
        DtlrayError: a target's accuracy is missing from either side.
    """
    rows = []
    for target in targets:
        key = f"target/{target}/{split}_acc"
        if key not in finetuned or key not in scratch:
            side = BEST_FILE if key not in finetuned else f"{BASELINE_DIR}/{BASELINE_FILE}"
            raise DtlrayError(f"{side} has no {key!r}; rerun dtlray report with --baseline")
        rows.append(GainRow(target, float(finetuned[key]), float(scratch[key])))
    mean = GainRow(
        "mean",
        sum(r.finetuned for r in rows) / len(rows),
        sum(r.scratch for r in rows) / len(rows),
    )
    return [*rows, mean]


def scratch_config(best: Mapping[str, Any]) -> TrialConfig:
    """The best trial's config trained from scratch for the finetune epochs it actually ran."""
    from dtlray.config import TrialConfig

    cfg = TrialConfig.from_dict(best["config"])
    epochs = int(best.get("epochs") or cfg.stage2.epochs)
    return TrialConfig.from_flat(
        {
            "stage2.init": "scratch",
            "stage2.epochs": epochs,
            "stage2.freeze_backbone_epochs": min(cfg.stage2.freeze_backbone_epochs, epochs),
        },
        base=cfg,
    )


def load_baseline(experiment: Path, expected: TrialConfig) -> tuple[dict[str, Any] | None, str]:
    """The stored scratch baseline when it was trained for ``expected``.

    Returns:
        ``(record, "")``, or ``(None, why)`` when there is none or it is for another config.
    """
    path = baseline_file(experiment)
    if not path.is_file():
        return None, "not run yet"
    record = read_json(str(path))
    if _comparable(record.get("config", {})) != _comparable(expected.to_dict()):
        return None, "the stored one was trained for another configuration (the best changed)"
    return record, ""


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    # Where the data lives does not change what the baseline measures.
    data = {k: v for k, v in config.get("data", {}).items() if k != "root"}
    return {**config, "data": data}
