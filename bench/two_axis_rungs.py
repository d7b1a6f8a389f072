"""Draw the rungs of a finished two-axis search: every trial at its stage-1 budget, by the target
val acc it reached, with a line from each promoted configuration to its run at the next budget.

    .venv/bin/python bench/two_axis_rungs.py EXPERIMENT --png docs/two-axis-rungs.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET, EPOCHS = "stage1.epochs", "stage2.epochs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "two-axis-rungs.png")
    args = parser.parse_args(argv)

    from dtlray.report.records import load_trials

    trials = [t for t in load_trials(args.experiment) if BUDGET in t.params and t.history]
    if not trials:
        print(f"{args.experiment}: no two-axis trials (no {BUDGET} in their configs)")
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def config(t):  # the searched values without the two the scheduler sets
        return json.dumps({k: v for k, v in t.params.items() if k not in (BUDGET, EPOCHS)},
                          sort_keys=True)  # fmt: skip

    budgets = sorted({t.params[BUDGET] for t in trials})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    points = {}
    for t in sorted(trials, key=lambda t: t.order):
        value = t.value("target/val_acc")
        if value is None:
            continue
        x = budgets.index(t.params[BUDGET])
        points[(config(t), x)] = value
        full = t.params[EPOCHS] == max(u.params[EPOCHS] for u in trials)
        ax.scatter(x, value, s=60 if full else 30, marker="o" if full else "s",
                   color="tab:red" if full else "tab:blue", zorder=3)  # fmt: skip
    for (key, x), value in points.items():
        if (key, x + 1) in points:
            ax.plot([x, x + 1], [value, points[(key, x + 1)]], color="grey", lw=1, zorder=2)
    ax.set_xticks(range(len(budgets)), [f"{b} stage-1 epoch(s)" for b in budgets])
    ax.set_ylabel("target/val_acc (last report)")
    ax.set_title(f"two-axis rungs: {len(trials)} trials; lines: promotions; red: full finetune")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    for b in budgets:
        at = [t for t in trials if t.params[BUDGET] == b]
        print(f"budget {b}: {len(at)} trial(s)")
    print(f"rungs: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
