"""The report's plots, each a PNG: optimization history, parameter importances, learning curves
of the top trials, stage-1 reuse.

matplotlib loads on the first plot, with the Agg backend unless someone chose one already; the
figures are drawn without touching matplotlib's global style.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

    from dtlray.report.records import Experiment, TrialRecord
    from dtlray.report.transfer import Stage1Summary

PLOTS = ("history.png", "importance.png", "curves.png", "stage1.png")


def use_agg() -> None:
    """Draw off-screen (Agg), unless a backend was chosen already."""
    import matplotlib

    # Only when no one chose a backend yet: a notebook that imported pyplot keeps its own.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def plot_history(study: optuna.Study, metric: str, path: Path) -> None:
    """Optuna's optimization history (objective per trial and best so far) as a PNG."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
        fig = ax.figure
        try:
            fig.set_size_inches(8, 4.5)
            direction = "max" if study.direction.name == "MAXIMIZE" else "min"
            ax.set_title(f"Optimization history: {metric} ({direction}) per trial")
            ax.set_xlabel("Trial (in the order Tune started them, from 0)")
            ax.set_ylabel(metric)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.margins(y=0.12)  # room for the best trial's label
            handles, labels = ax.get_legend_handles_labels()
            names = {metric: "trial's last value", "Best Value": "best so far"}
            ax.legend(handles, [names.get(label, label) for label in labels], loc="best")
            complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if complete:  # pruned trials have no final value to be the best
                pick = max if direction == "max" else min
                best = pick(complete, key=lambda t: t.value)
                ax.annotate(
                    f"best: {best.user_attrs.get('tune_trial_id', best.number)} ({best.value:.4f})",
                    (best.number, best.value),
                    textcoords="offset points",
                    xytext=(6, 6),
                    fontsize=9,
                )
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)


def plot_importances(importances: Mapping[str, float], path: Path) -> None:
    """Horizontal bars, most important on top."""
    from matplotlib.figure import Figure

    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(names)))
    ax = fig.subplots()
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set_xlim(0, max(1.0, max(values) * 1.15))
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_title("Parameter importances")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(exp: Experiment, top_k: int, path: Path) -> list[TrialRecord]:
    """The objective per finetune epoch: the top ``top_k`` trials in colour, the rest in grey.

    Returns:
        The trials drawn in colour, best first.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ranked = [t for t in exp.ranked() if t.curve(exp.metric)]
    top = ranked[:top_k]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, trial in enumerate(ranked[top_k:]):
        xs, ys = zip(*trial.curve(exp.metric), strict=True)
        ax.plot(xs, ys, color="0.75", lw=1, label="other trials" if i == 0 else None)
    for trial in top:
        xs, ys = zip(*trial.curve(exp.metric), strict=True)
        value = trial.value(exp.metric) or math.nan
        stopped = ", stopped early" if trial.status_text.startswith("stopped") else ""
        label = f"{trial.trial_id} ({value:.4f}{stopped})"
        ax.plot(xs, ys, marker="o", ms=4, lw=1.8, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("finetune epoch")
    ax.set_ylabel(exp.metric)
    ax.set_title(f"Learning curves: top {len(top)} trial(s) by final {exp.metric}")
    ax.grid(alpha=0.3)
    ax.legend(title="trial (final value)", fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return top


def plot_stage1(summary: Stage1Summary, path: Path) -> None:
    """Two bar panels: how many trials pretrained vs reused, and the seconds spent vs saved."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 3.6))
    left, right = fig.subplots(1, 2)
    colors = ["#dd8452", "#55a868"]
    bars = left.bar(["computed", "reused"], [summary.computed, summary.reused], color=colors)
    left.bar_label(bars, padding=2)
    left.set_ylabel("trials")
    left.set_title("Stage 1 per trial")
    left.set_ylim(0, max(summary.computed, summary.reused, 1) * 1.25)
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    seconds = [summary.seconds_spent, summary.seconds_saved]
    bars = right.bar(["spent pretraining", "saved by reuse"], seconds, color=colors)
    right.bar_label(bars, labels=[f"{s:.0f} s" for s in seconds], padding=2)
    right.set_ylabel("pretraining seconds")
    right.set_title("Stage-1 compute")
    right.set_ylim(0, max(*seconds, 1.0) * 1.25)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Stage-1 reuse across the search")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
