"""What stage 1 bought: its reuse across the search, and the transfer gain over the scratch
baseline (the best configuration trained from scratch, see :mod:`dtlray.baseline`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtlray.baseline import BASELINE_FILE, baseline_file
from dtlray.errors import DtlrayError
from dtlray.experiment import BASELINE_DIR, BEST_FILE, ExperimentDir, exists, read_json

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
    seconds_saved: float  # pretraining the reused ones (and the continued epochs) would have cost
    continued: int = 0  # computed ones that continued a stored constant phase (the stage tree)
    epochs_continued: float = 0  # the stage-1 epochs those did not train again


def stage1_summary(trials: Sequence[TrialRecord]) -> Stage1Summary:
    """Counts and seconds from each trial's last report (as ``dtlray tune`` prints them)."""
    used = [t for t in trials if t.stage1 is not None]
    computed = [t for t in used if t.stage1 == "computed"]
    reused = [t for t in used if t.stage1 == "reused"]
    continued = [t for t in computed if t.stage1_reused_epochs > 0]
    # A computed trial's own work is its stage1/seconds (for a continued one: what it trained
    # on top of the stored constant phase; otherwise the whole compute).
    spent = sum(t.stage1_seconds for t in continued)
    spent += sum(t.stage1_compute_seconds for t in computed if t.stage1_reused_epochs == 0)
    return Stage1Summary(
        computed=len(computed),
        reused=len(reused),
        not_used=sum(1 for t in used if t.stage1 == "scratch"),
        seconds_spent=spent,
        seconds_saved=sum(t.stage1_compute_seconds for t in reused)
        + sum(t.stage1_compute_seconds - t.stage1_seconds for t in continued),
        continued=len(continued),
        epochs_continued=sum(t.stage1_reused_epochs for t in continued),
    )


CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 10_000


@dataclass(frozen=True)
class GainRow:
    """One target's accuracy finetuned from stage 1 vs trained from scratch.

    Attributes:
        ci_pp: the gain's confidence interval in percentage points (a paired bootstrap, see
            :func:`gain_intervals`); None when per-image predictions are missing.
    """

    target: str
    finetuned: float
    scratch: float
    ci_pp: tuple[float, float] | None = None

    @property
    def gain_pp(self) -> float:
        """Finetuned minus scratch, in percentage points."""
        return (self.finetuned - self.scratch) * 100.0

    @property
    def verdict(self) -> str:
        """Transfer is called only when the interval excludes 0."""
        if self.ci_pp is None:
            return "no interval"
        low, high = self.ci_pp
        if low > 0:
            return "positive transfer"
        if high < 0:
            return "negative transfer"
        return "no significant difference"

    @property
    def negative(self) -> bool:
        """Negative transfer: stage 1 made this target significantly worse than no pretraining."""
        return self.verdict == "negative transfer"

    def to_dict(self) -> dict[str, Any]:
        return {
            "finetuned": self.finetuned,
            "scratch": self.scratch,
            "gain_pp": self.gain_pp,
            "ci_pp": list(self.ci_pp) if self.ci_pp is not None else None,
            "verdict": self.verdict,
        }


def transfer_gain(
    targets: Sequence[str],
    finetuned: Mapping[str, float],
    scratch: Mapping[str, float],
    split: str = "test",
    intervals: Mapping[str, tuple[float, float]] | None = None,
) -> list[GainRow]:
    """One row per target plus a final ``mean`` row (the mean over targets).

    Args:
        targets: the target dataset names.
        finetuned: metrics of the best config (``target/<task>/<split>_acc``).
        scratch: metrics of its scratch baseline, same keys (the mean over its seeds).
        split: ``test`` or ``val``.
        intervals: the gains' confidence intervals (pp) by target and ``mean``, if known.

    Raises:
        DtlrayError: a target's accuracy is missing from either side.
    """
    intervals = intervals or {}
    rows = []
    for target in targets:
        key = f"target/{target}/{split}_acc"
        if key not in finetuned or key not in scratch:
            side = BEST_FILE if key not in finetuned else f"{BASELINE_DIR}/{BASELINE_FILE}"
            raise DtlrayError(f"{side} has no {key!r}; rerun dtlray report with --baseline")
        rows.append(
            GainRow(target, float(finetuned[key]), float(scratch[key]), intervals.get(target))
        )
    mean = GainRow(
        "mean",
        sum(r.finetuned for r in rows) / len(rows),
        sum(r.scratch for r in rows) / len(rows),
        intervals.get("mean"),
    )
    return [*rows, mean]


Predictions = Mapping[str, Mapping[str, Sequence[int]]]  # task -> {"label": [...], "pred": [...]}


def gain_intervals(
    targets: Sequence[str],
    finetuned: Predictions,
    scratch_runs: Sequence[Predictions],
    *,
    confidence: float = CONFIDENCE,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Confidence intervals (pp) of finetuned minus scratch accuracy, per target and their mean.

    A paired bootstrap: both models predicted the same test images, so each replicate resamples
    a target's images with replacement and scores both models on the same resample; with several
    scratch runs (seeds) each replicate also draws one of them, so the interval covers the
    scratch model's seed-to-seed spread too. A replicate's gain depends only on how many drawn
    images only the finetuned model got right and how many only the scratch one did, so those
    counts are drawn directly (multinomially) -- the same distribution as resampling indices,
    at a cost independent of the test set's size. The mean row resamples every target within a
    replicate (one scratch seed for all: the same model predicts every target).

    Raises:
        DtlrayError: the two sides did not predict the same images (labels differ).
    """
    if not scratch_runs:
        raise ValueError("no scratch runs")
    rng = np.random.default_rng(seed)
    runs = rng.integers(len(scratch_runs), size=samples)
    gains = np.empty((len(targets), samples))
    for i, target in enumerate(targets):
        labels = np.asarray(finetuned[target]["label"])
        ours = np.asarray(finetuned[target]["pred"]) == labels
        # Per scratch run: the shares of images only we got right, and only it got right.
        shares = np.empty((len(scratch_runs), 3))
        for j, run in enumerate(scratch_runs):
            if list(run[target]["label"]) != labels.tolist():
                raise DtlrayError(
                    f"the scratch baseline's {target} test labels differ from the best trial's "
                    "(the dataset changed since?); rerun dtlray report with --baseline"
                )
            theirs = np.asarray(run[target]["pred"]) == labels
            only_ours, only_theirs = (ours & ~theirs).mean(), (~ours & theirs).mean()
            shares[j] = only_ours, only_theirs, 1.0 - only_ours - only_theirs
        counts = rng.multinomial(labels.size, shares[runs])
        gains[i] = (counts[:, 0] - counts[:, 1]) / labels.size * 100.0
    tail = (1.0 - confidence) / 2 * 100.0
    out = {}
    for name, values in [*zip(targets, gains, strict=True), ("mean", gains.mean(axis=0))]:
        low, high = np.percentile(values, [tail, 100.0 - tail])
        out[name] = (float(low), float(high))
    return out


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
        ``(record, "")``, or ``(None, why)`` when there is none, it is for another config, or it
        predates per-image predictions (no interval can be computed from it).
    """
    path = baseline_file(experiment)
    if not path.is_file():
        return None, "not run yet"
    record = read_json(str(path))
    if _comparable(record.get("config", {})) != _comparable(expected.to_dict()):
        return None, "the stored one was trained for another configuration (the best changed)"
    if not record.get("runs"):
        return None, "the stored one has no per-image test predictions (an older dtlray made it)"
    return record, ""


def finetuned_predictions(experiment: Path, best: Mapping[str, Any]) -> tuple[Any, str]:
    """The best trial's per-image test predictions: stored by the search, else computed now
    from its checkpoint (and stored).

    Returns:
        ``(predictions, "")`` (task -> ``{"label", "pred"}``), or ``(None, why)``.
    """
    exp = ExperimentDir(str(experiment))
    stored = exp.read_predictions(best.get("trial_id"))
    if stored is not None:
        return stored, ""
    checkpoint = best.get("checkpoint_path")
    if not checkpoint or not exists(checkpoint):
        return None, f"the best trial's checkpoint is gone ({checkpoint})"
    from dtlray.evaluate import evaluate_checkpoint

    _, predictions = evaluate_checkpoint(checkpoint)
    exp.write_predictions(best.get("trial_id"), predictions)
    return predictions, ""


def transfer_summary(rows: Sequence[GainRow], split: str, seeds: int) -> dict[str, Any]:
    """The gain table as ``best.json`` stores it (its ``transfer`` entry)."""
    return {
        "split": split,
        "confidence": CONFIDENCE,
        "method": f"paired bootstrap over {split} images and {seeds} scratch seed(s), "
        f"{BOOTSTRAP_SAMPLES} replicates",
        "baseline_seeds": seeds,
        "targets": {row.target: row.to_dict() for row in rows[:-1]},
        "mean": rows[-1].to_dict(),
    }


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    # Where the data lives does not change what the baseline measures.
    data = {k: v for k, v in config.get("data", {}).items() if k != "root"}
    return {**config, "data": data}
