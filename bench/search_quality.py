"""Replay dtlray's searchers on the recorded learning-curve table, without training.

The table (``bench/curves/curves.parquet``, made by ``bench/collect_curves.py``) holds, for a
grid over backbone x fusion depth x stage-1 budget x finetune lr x lr_mult_backbone, every
finetune epoch's target val and test accuracy and what each cost. A replay runs the search
*as ``dtlray tune`` builds it* on a simulated clock:

* the searcher is ``dtlray.searcher.build_searcher`` (Optuna TPE or random behind Ray's
  ``OptunaSearch``, with dtlray's true trial states and the space's default point first) and
  the scheduler is ``dtlray.search.build_trial_scheduler`` (Ray's ``ASHAScheduler`` on finetune
  epochs, or FIFO) -- the real objects, called the way Tune's ``TuneController`` calls them: a
  new trial is suggested when a slot frees, every epoch's result goes to the scheduler and,
  unless it says STOP, to the searcher; a finished or stopped trial goes to both with its last
  result;
* ``max_concurrent_trials`` slots, and the stage-1 reuse rule of a search: the first trial that
  needs a stage-1 configuration computes it, a trial that needs one being computed waits for it
  holding its slot, later ones load it;
* the clock advances by the measured costs: Tune's per-trial cost around the trial (from
  ``bench/train_overhead.py``: ``--first-trial-overhead`` for each slot's first trial, which starts
  a trial process; ``--trial-overhead`` for the later ones, which reuse it), the trial's set-up,
  the stage-1 compute or load, and the wall of every finetune epoch it runs. A waiting trial's
  CPUs lent to the trial computing its stage 1 (see ``dtlray.stage1_claims``) are not modelled:
  the replay's stage 1 takes its single-slot time.

A sampled learning rate (continuous, log scale) is snapped to the nearest recorded value (in
log space): TPE sees the value it sampled and the accuracy of its nearest grid neighbour.

Compute is slot-seconds held by trials (a waiting trial's slot counts). A searcher's anytime
curve is the test accuracy of the trial it would pick on validation (best last-reported
``target/val_acc``, as ``best.json`` picks) against compute spent. Every searcher gets the same
compute budget: the median compute of random + FIFO running the space's ``num_samples`` trials.

    .venv/bin/python bench/search_quality.py                 # 30 seeds, ~1 min on 2 cores
    .venv/bin/python bench/search_quality.py --seeds 100 --trials 24
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TABLE = ROOT / "bench" / "curves" / "curves.parquet"
# The same grid with a warmup-stable-decay stage 1 (collect_curves.py --schedule wsd): what a
# searcher with stage1.schedule: wsd (the two-axis search) trains, so its accuracies come from it.
WSD_TABLE = ROOT / "bench" / "curves-wsd" / "curves.parquet"
LOGME_FILE = "logme.json"  # by the table: written by logme_rank.py
SPACE = ROOT / "search_spaces" / "quickstart_asha.yaml"
# A one-worker search trial's cost around its own work, from bench/train_overhead.py on this
# 2-core machine: a slot's first trial starts a trial process (its imports, Tune's bookkeeping);
# later trials reuse that process.
FIRST_TRIAL_OVERHEAD_S = 3.5  # measured 3.32-3.57 s (3 runs)
TRIAL_OVERHEAD_S = 0.0  # measured -0.03-0.12 s (3 runs)
# name: overrides of the space's searcher/scheduler (dotted keys). "tpe+asha" is the space as it
# is: what `dtlray tune` runs by default. STOPPED_AS_COMPLETE: ASHA-stopped trials told to Optuna
# as COMPLETE with their partial value (Ray's OptunaSearch alone), not PRUNED (dtlray's).
# UNORDERED: without dtlray's stage-1-aware ordering (a trial may start only to wait).
STOPPED_AS_COMPLETE = "stopped_as_complete"
UNORDERED = "unordered"
SEARCHERS: dict[str, dict[str, Any]] = {
    "random+fifo": {"searcher.type": "random", "scheduler.type": "fifo"},
    "random+asha": {"searcher.type": "random"},
    "tpe+fifo": {"scheduler.type": "fifo"},
    "tpe+asha": {},
    "tpe+asha(stopped=COMPLETE)": {STOPPED_AS_COMPLETE: True},
    "tpe+asha(unordered)": {UNORDERED: True},
    # Successive halving over the table's stage-1 budgets, ASHA over finetune epochs, with the
    # stage tree (stage1.schedule: wsd): see dtlray.two_axis.
    "two-axis": {"scheduler.type": "two_axis", "stage1.schedule": "wsd"},
    # The LogME rung (dtlray.logme_rung) in front of ASHA: a trial whose stage 1 is in the
    # bottom quarter by LogME (curves/logme.json, from logme_rank.py) stops at its first result.
    "tpe+asha+logme": {"scheduler.logme_quantile": 0.25},
}
DEFAULT = "tpe+asha"
REFERENCE = "random+fifo"
CONFIG_KEYS = ("backbone", "fusion_depth", "stage1_epochs", "lr", "lr_mult_backbone")
SPACE_KEYS = {
    "model.backbone": "backbone",
    "model.fusion_depth": "fusion_depth",
    "stage1.epochs": "stage1_epochs",
    "stage2.lr": "lr",
    "stage2.lr_mult_backbone": "lr_mult_backbone",
}


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One configuration's finetune: per-epoch val/test accuracy and wall, and its stage 1."""

    stage1_key: tuple[Any, ...]
    val: tuple[float, ...]
    test: tuple[float, ...]
    wall: tuple[float, ...]
    setup_seconds: float


@dataclass
class CurveTable:
    curves: dict[tuple[Any, ...], Curve]
    stage1_seconds: dict[tuple[Any, ...], float]
    stage1_load_seconds: float
    axes: dict[str, list[Any]]
    meta: dict[str, Any]
    # wsd tables: stage-1 config -> (stored constant epochs it continued, what the rest cost)
    continued: dict[tuple[Any, ...], tuple[int, float]] = field(default_factory=dict)
    # stage-1 config -> target/<task>/logme of its trunk (logme.json by the table; may be empty)
    logme: dict[tuple[Any, ...], dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CurveTable:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"dtlray_curves", b"{}"))
        rows = table.to_pylist()
        by_config: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for row in rows:
            by_config.setdefault(tuple(row[k] for k in CONFIG_KEYS), []).append(row)
        curves, stage1, loads, continued = {}, {}, [], {}
        for key, epochs in by_config.items():
            epochs.sort(key=lambda r: r["epoch"])
            first = epochs[0]
            s1 = key[:3]
            if first["stage1_mode"] == "computed" or s1 not in stage1:
                stage1[s1] = first["stage1_compute_seconds"]
            if first["stage1_mode"] == "computed" and first.get("stage1_reused_epochs", 0) > 0:
                continued[s1] = (first["stage1_reused_epochs"], first["stage1_seconds"])
            if first["stage1_mode"] == "reused":
                loads.append(first["stage1_load_seconds"])
            curves[key] = Curve(
                stage1_key=s1,
                val=tuple(r["val_acc"] for r in epochs),
                test=tuple(r["test_acc"] for r in epochs),
                wall=tuple(r["wall_seconds"] for r in epochs),
                setup_seconds=first["setup_seconds"],
            )
        axes = {k: sorted({key[i] for key in curves}) for i, k in enumerate(CONFIG_KEYS)}
        logme = {}
        if (path.parent / LOGME_FILE).exists():
            for record in json.loads((path.parent / LOGME_FILE).read_text()):
                s1 = tuple(record.pop(k) for k in CONFIG_KEYS[:3])
                logme[s1] = record
        load = float(np.median(loads)) if loads else 0.0
        return cls(curves, stage1, load, axes, meta, continued, logme)

    def with_accuracies(self, other: CurveTable) -> CurveTable:
        """This table's costs with ``other``'s accuracies (same grid): a WSD table collected on
        another machine than the cosine one is replayed at the cosine table's costs, so every
        searcher pays the same machine's prices; the stage tree prices its continuations."""
        curves = {}
        for key, curve in self.curves.items():
            theirs = other.curves[key]
            # A run that diverged here but not there: its later epochs at its median wall.
            missing = len(theirs.val) - len(curve.wall)
            wall = curve.wall + (float(np.median(curve.wall)),) * max(0, missing)
            curves[key] = replace(curve, val=theirs.val, test=theirs.test, wall=wall)
        return replace(self, curves=curves)

    def curve(self, sampled: dict[str, Any]) -> Curve:
        """The recorded configuration nearest a sampled one (log scale for the rates)."""
        key = []
        for space_key, name in SPACE_KEYS.items():
            value, axis = sampled[space_key], self.axes[name]
            if name in ("lr", "lr_mult_backbone"):
                value = min(axis, key=lambda v: abs(math.log(v) - math.log(value)))
            elif value not in axis:
                raise SystemExit(f"{space_key}={value!r} is not in the table ({axis})")
            key.append(value)
        return self.curves[tuple(key)]

    @property
    def epochs(self) -> int:
        return max(len(c.val) for c in self.curves.values())


def replay_space(table: CurveTable, overrides: dict[str, Any], seed: int) -> Any:
    """The quickstart space, searching the table's stage-1 budgets too, as ``dtlray tune`` sees
    it with ``overrides`` (dotted keys into the space file, e.g. ``scheduler.type``)."""
    from dtlray.search_space import parse_space

    raw = yaml.safe_load(SPACE.read_text())
    raw["search"]["stage1.epochs"] = {"choices": table.axes["stage1_epochs"]}
    # The space's backbones and depths, unless the table has other ones (e.g. a --quick table).
    if raw["search"]["model.backbone"].get("choices") != table.axes["backbone"]:
        raw["search"]["model.backbone"] = {"choices": table.axes["backbone"]}
    depth = raw["search"]["model.fusion_depth"]
    if list(range(depth.get("low", 0), depth.get("high", -1) + 1)) != table.axes["fusion_depth"]:
        raw["search"]["model.fusion_depth"] = {"choices": table.axes["fusion_depth"]}
    raw["trial"]["stage2"]["epochs"] = table.epochs
    raw["searcher"]["seed"] = seed
    if overrides.get("scheduler.type") == "two_axis":  # it sets the stage-1 budget itself
        del raw["search"]["stage1.epochs"]
        raw["scheduler"]["stage1_budgets"] = table.axes["stage1_epochs"]
    for key, value in overrides.items():
        if key in (STOPPED_AS_COMPLETE, UNORDERED):
            continue
        if key == "stage1.schedule":
            raw["trial"]["stage1"]["schedule"] = value
            continue
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    if raw["scheduler"].get("type") == "fifo":
        raw["scheduler"] = {"type": "fifo"}
    if raw["scheduler"].get("type") != "two_axis":
        raw["scheduler"].pop("stage1_budgets", None)
    return parse_space(raw, source=str(SPACE))


# -- one replay ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One replayed search: the anytime curve and what it spent."""

    points: list[tuple[float, float, float]] = field(default_factory=list)  # compute, test, val
    compute: float = 0.0
    trials: int = 0
    stopped: int = 0
    waited: float = 0.0  # slot-seconds trials spent waiting for a stage 1 another one computed
    stage1_spent: float = 0.0  # stage-1 compute the search paid (reuse, and the tree for wsd)
    stage1_alone: float = 0.0  # what its trials' stage 1s would cost with no reuse at all

    def test_at(self, compute: float) -> float:
        """The picked trial's test accuracy once ``compute`` slot-seconds were spent."""
        best = math.nan
        for c, test, _ in self.points:
            if c > compute:
                break
            best = test
        return best

    def compute_to_reach(self, test: float) -> float:
        for c, t, _ in self.points:
            if t >= test:
                return c
        return math.inf


def replay(
    name: str,
    table: CurveTable,
    seed: int,
    *,
    budget: float = math.inf,
    max_trials: int = 10_000,
    trial_overhead: tuple[float, float] = (FIRST_TRIAL_OVERHEAD_S, TRIAL_OVERHEAD_S),
) -> Run:
    """Run searcher ``name`` on the table until ``max_trials`` ran or ``budget`` was spent."""
    import optuna
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from dtlray.search import build_trial_scheduler
    from dtlray.searcher import build_searcher
    from dtlray.stage1_order import Stage1OrderedSearch

    overrides = SEARCHERS[name]
    # num_samples as the replay runs it: a trial count, or (under a compute budget) no limit.
    space = replay_space(table, overrides, seed).model_copy(update={"num_samples": max_trials})
    np.random.seed(seed)  # ASHA picks a trial's bracket from numpy's global RNG, as in Tune
    searcher = build_searcher(space, study_name=f"replay-{name}-{seed}")
    if overrides.get(STOPPED_AS_COMPLETE):  # what Ray's OptunaSearch alone tells Optuna
        searcher.on_trial_complete = OptunaSearch.on_trial_complete.__get__(searcher)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    clock = {"now": 0.0}
    stage1_ready: dict[tuple[Any, ...], float] = {}
    if not overrides.get(UNORDERED):  # as dtlray tune wraps every searcher when reusing stage 1
        searcher = Stage1OrderedSearch(
            searcher,
            stage1_key=lambda config: table.curve(config).stage1_key,
            is_stored=lambda key: stage1_ready.get(key, math.inf) <= clock["now"],
            num_samples=max_trials,
        )
    scheduler = build_trial_scheduler(space)
    scheduler.set_search_properties(space.objective.metric, space.objective.mode)
    metric = space.objective.metric
    slots = space.max_concurrent_trials

    run = Run()
    events: list[tuple[float, int, str, int]] = []
    curves: dict[str, Curve] = {}
    latest: dict[str, tuple[float, float]] = {}  # trial -> (last val, its test)
    trials: dict[str, SimpleNamespace] = {}
    planned: dict[str, int] = {}  # finetune epochs a trial runs (two-axis: short below the top)
    running = 0
    now = 0.0
    seq = 0
    wsd = space.trial.stage1.schedule == "wsd"
    tree = StageTree(space.trial.stage1.decay_fraction) if wsd else None

    def launch() -> bool:
        nonlocal running, seq
        trial_id = f"t{run.trials:05d}"
        sampled = searcher.suggest(trial_id)
        if sampled is None or sampled == Searcher.FINISHED:
            return False
        curve = table.curve(sampled)
        trials[trial_id] = SimpleNamespace(
            trial_id=trial_id, config=sampled
        )  # Tune's Trial, as read
        scheduler.on_trial_add(None, trials[trial_id])
        curves[trial_id] = curve
        planned[trial_id] = int(sampled.get("stage2.epochs", len(curve.val)))
        # A slot's first trial starts a trial process; later ones reuse a finished trial's.
        overhead = trial_overhead[0] if run.trials < slots else trial_overhead[1]
        start = now + overhead + curve.setup_seconds
        ready = stage1_ready.get(curve.stage1_key)
        run.stage1_alone += table.stage1_seconds[curve.stage1_key]
        if ready is None:  # this trial computes the stage 1 (single-flight claim)
            seconds = table.stage1_seconds[curve.stage1_key]
            if tree is not None:  # wsd: continue the longest stored constant phase
                seconds = tree.compute(curve.stage1_key, seconds, start)
            begin = start + seconds
            run.stage1_spent += seconds
            stage1_ready[curve.stage1_key] = begin
        else:  # loads it, after waiting for the trial computing it if need be
            run.waited += max(0.0, ready - start)
            begin = max(start, ready) + table.stage1_load_seconds
        heapq.heappush(events, (begin + curve.wall[0], seq, trial_id, 1))
        seq += 1
        running += 1
        run.trials += 1
        return True

    while True:
        while running < slots and run.trials < max_trials and run.compute < budget:
            if not launch():
                break
        if not events:
            break
        t, _, trial_id, epoch = heapq.heappop(events)
        spent = run.compute + running * (t - now)
        if spent > budget:
            run.compute = budget
            break
        run.compute, now = spent, t
        clock["now"] = now
        curve = curves[trial_id]
        val = curve.val[epoch - 1]
        diverged = math.isnan(val)
        result = {"training_iteration": epoch, "epoch": epoch, metric: val, "diverged": diverged}
        if epoch == 1:  # a trial reports its trunk's LogME with its first result
            result.update(table.logme.get(curve.stage1_key, {}))
        trial = trials[trial_id]
        decision = scheduler.on_trial_result(None, trial, result)
        if decision != TrialScheduler.STOP:
            searcher.on_trial_result(trial_id, result)
        if not diverged:
            latest[trial_id] = (val, curve.test[epoch - 1])
            best = max(latest, key=lambda k: latest[k][0])
            run.points.append((run.compute, latest[best][1], latest[best][0]))
        if decision == TrialScheduler.STOP or diverged or epoch == planned[trial_id]:
            run.stopped += epoch < planned[trial_id] and not diverged
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial_id, result=result)
            running -= 1
        else:
            heapq.heappush(events, (t + curve.wall[epoch], seq, trial_id, epoch + 1))
            seq += 1
    return run


class StageTree:
    """The stage tree's stage-1 costs (``schedule: wsd``): a run of budget b continues the longest
    stored constant phase of its configuration and pays only for the rest of its epochs; it
    stores its own constant phase (b minus its decay epochs) when it gets there.

    ``full_seconds`` is the budget's stage-1 compute from scratch; the rest is priced per epoch
    at its mean (``compare_wsd`` prints how that matches the continuations the WSD table
    measured). The accuracies are the WSD table's when there is one (``--wsd-table``); without
    it, the cosine table's, assuming WSD matches cosine at equal budget (Hägele et al. 2024).
    """

    def __init__(self, decay_fraction: float) -> None:
        from dtlray.config import TrialConfig

        self._config = TrialConfig
        self._fraction = decay_fraction
        self._stored: dict[tuple[Any, ...], list[tuple[int, float]]] = {}  # config -> (C, when)
        self.epochs_saved = 0

    def compute(self, key: tuple[Any, ...], full_seconds: float, start: float) -> float:
        """Seconds the stage 1 of ``key`` (backbone, depth, budget) costs a run starting now."""
        *config, budget = key
        stage1 = self._config.from_flat(
            {
                "stage1.schedule": "wsd",
                "stage1.epochs": budget,
                "stage1.decay_fraction": self._fraction,
            }  # fmt: skip
        ).stage1
        per_epoch = full_seconds / budget
        phases = self._stored.setdefault(tuple(config), [])
        have = max((c for c, when in phases if when <= start and c <= stage1.constant_epochs),
                   default=0)  # fmt: skip
        self.epochs_saved += have
        constant = stage1.constant_epochs
        if constant > have:
            phases.append((constant, start + (constant - have) * per_epoch))
        return (budget - have) * per_epoch


def compare_wsd(cosine: CurveTable, wsd: CurveTable) -> None:
    """What the WSD table measured against the cosine one: accuracy at equal stage-1 budget
    (per stage-1 configuration, over the finetunes both tables hold: their mean final test acc,
    and the test acc of the best-on-val one), and each measured continuation against the stage
    tree's price."""
    rows = []
    for s1 in sorted(set(cosine.stage1_seconds) & set(wsd.stage1_seconds)):
        keys = [k for k in wsd.curves if k[:3] == s1 and k in cosine.curves]  # the same finetunes
        if not keys:
            continue
        pair = []
        for table in (cosine, wsd):
            curves = [table.curves[k] for k in keys]
            finals = [c.test[-1] for c in curves if not math.isnan(c.val[-1])]
            pick = max(curves, key=lambda c: np.nan_to_num(c.val[-1], nan=-1.0))
            pair.append((float(np.mean(finals)) if finals else math.nan, pick.test[-1]))
        rows.append((s1, *pair))
    if not rows:
        return
    print("stage 1 wsd vs cosine at equal budget (final test acc: grid mean, best-on-val pick):")
    for s1, (cm, cp), (wm, wp) in rows:
        print(
            f"  {s1[0]:>9} d{s1[1]} {s1[2]} ep: mean {cm:.4f} -> {wm:.4f} ({wm - cm:+.4f}), "
            f"pick {cp:.4f} -> {wp:.4f} ({wp - cp:+.4f})"
        )
    means = [w[0] - c[0] for _, c, w in rows]
    picks = [w[1] - c[1] for _, c, w in rows]
    print(
        f"  median wsd - cosine: grid mean {np.median(means):+.4f}, pick {np.median(picks):+.4f} "
        f"over {len(rows)} stage-1 configs"
    )
    for s1, (reused, seconds) in sorted(wsd.continued.items()):
        budget = s1[2]
        priced = (budget - reused) * wsd.stage1_seconds[s1] / budget
        print(
            f"  continuation {s1[0]} d{s1[1]} to {budget} ep from {reused} stored: measured "
            f"{seconds:.0f}s, the tree prices it {priced:.0f}s (from scratch "
            f"{wsd.stage1_seconds[s1]:.0f}s)"
        )


def _replay_job(
    args: tuple[str, tuple[str, str | None], int, float, int, tuple[float, float], dict[str, Any]],
) -> tuple[str, int, Run]:
    name, (table_path, accuracies), seed, budget, max_trials, overhead, searchers = args
    SEARCHERS.update(searchers)  # --try variants, in this worker process too
    table = _table(table_path, accuracies)
    return (
        name,
        seed,
        replay(name, table, seed, budget=budget, max_trials=max_trials, trial_overhead=overhead),
    )


_TABLES: dict[tuple[str, str | None], CurveTable] = {}


def _table(path: str, accuracies: str | None = None) -> CurveTable:
    """The table at ``path``; with ``accuracies``, its costs with that table's accuracies."""
    if (path, accuracies) not in _TABLES:
        table = CurveTable.load(Path(path))
        if accuracies is not None:
            table = table.with_accuracies(_table(accuracies))
        _TABLES[path, accuracies] = table
    return _TABLES[path, accuracies]


# -- the report ---------------------------------------------------------------------------------


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _fraction(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{value:.2f}"


def plot(runs: dict[str, list[Run]], budget: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, budget, 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lows = []
    for name, rs in runs.items():
        curves = np.array([[r.test_at(c) for c in grid] for r in rs])
        with warnings.catch_warnings():  # before any trial reported, every seed is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            q1, q2, q3 = np.nanpercentile(curves, [25, 50, 75], axis=0)
        x = grid / 3600
        ax.plot(x, q2, label=name, lw=2 if name == DEFAULT else 1.2)
        ax.fill_between(x, q1, q3, alpha=0.15)
        lows.append(np.nanmin(q1[len(grid) // 4 :]))
    ax.set_ylim(bottom=min(lows) - 0.01)  # the last three quarters, where searchers differ
    ax.set_xlabel("compute (slot-hours)")
    ax.set_ylabel("test acc of the pick (median, IQR)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument(
        "--wsd-table",
        type=Path,
        default=WSD_TABLE,
        help="the WSD stage-1 table, for stage1.schedule: wsd searchers (if it exists)",
    )
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument(
        "--trials", type=int, default=None, help="random + FIFO's trials (default: num_samples)"
    )
    parser.add_argument("--first-trial-overhead", type=float, default=FIRST_TRIAL_OVERHEAD_S)
    parser.add_argument("--trial-overhead", type=float, default=TRIAL_OVERHEAD_S)
    parser.add_argument("--searchers", default=",".join(SEARCHERS))
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="add TPE + ASHA with these space overrides, e.g. scheduler.reduction_factor=3",
    )
    parser.add_argument(
        "--no-default-point",
        action="store_true",
        help="every searcher without the space's default point first (searcher."
        "start_from_default: false): the searchers alone",
    )
    parser.add_argument("--png", type=Path, default=ROOT / "bench" / "search_quality.png")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.searchers.split(",") if n.strip()]
    for spec in args.tries:
        overrides = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            overrides[key.strip()] = yaml.safe_load(value)
        SEARCHERS[f"tpe+asha[{spec}]"] = overrides
        names.append(f"tpe+asha[{spec}]")
    unknown = sorted(set(names) - set(SEARCHERS))
    if unknown or REFERENCE not in names:
        parser.error(f"--searchers: {', '.join(SEARCHERS)} (must include {REFERENCE})")
    if not args.table.exists():
        parser.error(f"{args.table} does not exist; run bench/collect_curves.py first")
    start = time.perf_counter()
    table = _table(str(args.table))
    wsd = _table(str(args.wsd_table)) if args.wsd_table.exists() else None
    # A collection still under way covers part of the grid: compared, not replayed.
    wsd_replays = wsd is not None and set(wsd.curves) == set(table.curves)
    if len(table.axes["stage1_epochs"]) < 2:  # nothing to halve over (e.g. a --quick table)
        dropped = [n for n in names if SEARCHERS[n].get("scheduler.type") == "two_axis"]
        names = [n for n in names if n not in dropped]
        if dropped:
            print(f"skipping {', '.join(dropped)}: the table has one stage-1 budget")
    if not table.logme:  # the LogME rung needs the trunks' scores
        dropped = [n for n in names if "scheduler.logme_quantile" in SEARCHERS[n]]
        names = [n for n in names if n not in dropped]
        if dropped:
            print(f"skipping {', '.join(dropped)}: no {LOGME_FILE} by the table (logme_rank.py)")
    trials = args.trials or replay_space(table, {}, 0).num_samples
    if args.no_default_point:
        for name in names:
            SEARCHERS[name] = {**SEARCHERS[name], "searcher.start_from_default": False}
    tries = {n: SEARCHERS[n] for n in names}
    print(
        f"table: {len(table.curves)} configurations x {table.epochs} epochs, "
        f"{len(table.stage1_seconds)} stage-1 configs ({args.table.name}; made on "
        f"{table.meta.get('machine', '?')})"
    )
    wsd_names = [n for n in names if tries[n].get("stage1.schedule") == "wsd"]
    if wsd_names:
        if wsd_replays:
            source = (
                f"accuracies from {_shown(args.wsd_table)} (WSD stage 1), costs from "
                f"{_shown(args.table)} (every searcher at one machine's prices)"
            )
        elif wsd is not None:
            source = (
                f"{_shown(args.wsd_table)} holds {len(wsd.curves)} of {len(table.curves)} "
                "configurations (compared below); the cosine table's accuracies assumed"
            )
        else:
            source = "no WSD table: the cosine table's accuracies assumed"
        print(f"{', '.join(wsd_names)}: {source}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    t0 = time.perf_counter()
    overhead = (args.first_trial_overhead, args.trial_overhead)
    hundred = replay(DEFAULT, table, 0, max_trials=100, trial_overhead=overhead)
    replay_100 = time.perf_counter() - t0

    seeds = range(args.seeds)
    with ProcessPoolExecutor(args.jobs) as pool:
        jobs = [
            (REFERENCE, (str(args.table), None), s, math.inf, trials, overhead, tries)
            for s in seeds
        ]
        reference = [run for _, _, run in pool.map(_replay_job, jobs)]
        budget = float(np.median([r.compute for r in reference]))
        cosine = (str(args.table), None)
        wsd_accuracies = (str(args.table), str(args.wsd_table) if wsd_replays else None)
        path = {n: wsd_accuracies if n in wsd_names else cosine for n in names}
        jobs = [(n, path[n], s, budget, 10_000, overhead, tries) for n in names for s in seeds]
        runs: dict[str, list[Run]] = {n: [] for n in names}
        for name, _, run in pool.map(_replay_job, jobs):
            runs[name].append(run)

    # The lower median: an accuracy random + FIFO actually reached (not between two seeds).
    target = float(np.percentile([r.test_at(budget) for r in runs[REFERENCE]], 50, method="lower"))
    oracle = max(max(c.test[-1] for c in table.curves.values()), 0.0)
    best_val = max(table.curves.values(), key=lambda c: np.nan_to_num(c.val[-1], nan=-1.0))
    print(
        f"budget: {budget / 3600:.2f} slot-hours = median compute of {REFERENCE} with "
        f"{trials} trials; its final pick's test acc (median over {args.seeds} seeds) = "
        f"{target:.4f}"
    )
    print(
        f"table: best final test acc {oracle:.4f}; the best-on-val configuration's test acc "
        f"{best_val.test[-1]:.4f}"
    )
    print()
    header = (
        f"{'searcher':28} {'trials':>7} {'stopped':>8} {'waiting':>8} {'final test (IQR)':>22} "
        f"{'compute to reach (IQR)':>26}"
    )
    print(header)
    print("-" * len(header))
    fractions: dict[str, float] = {}
    finals = {n: [r.test_at(budget) for r in rs] for n, rs in runs.items()}
    for name, rs in runs.items():
        reach = [r.compute_to_reach(target) / budget for r in rs]
        r1, r2, r3 = _quartiles(reach)
        f1, f2, f3 = _quartiles(finals[name])
        fractions[name] = r2
        print(
            f"{name:28} {np.median([r.trials for r in rs]):7.0f} "
            f"{np.median([r.stopped for r in rs]):8.0f} "
            f"{np.median([r.waited for r in rs]) / budget:8.1%} "
            f"{f2:8.4f} ({f1:.4f}-{f3:.4f}) "
            f"{_fraction(r2):>10} ({_fraction(r1)}-{_fraction(r3)})"
        )
    print()
    for name in names:
        if name == REFERENCE:
            continue
        gaps = np.array(finals[name]) - np.array(finals[REFERENCE])  # paired by seed
        g1, g2, g3 = _quartiles(gaps)
        print(
            f"final test acc at equal compute, {name} - {REFERENCE}: median {g2:+.4f} "
            f"(IQR {g1:+.4f} to {g3:+.4f}), better on {int((gaps > 0).sum())}/"
            f"{len(gaps)} seeds, worse on {int((gaps < 0).sum())}"
        )
    saving = {
        n: float(np.median([r.stage1_alone / max(r.stage1_spent, 1e-9) for r in rs]))
        for n, rs in runs.items()
    }
    print(
        "stage-1 compute with no reuse at all / what the search paid (median): "
        + ", ".join(f"{n} {v:.2f}x" for n, v in saving.items())
    )
    if wsd is not None:
        compare_wsd(table, wsd)
    start_point = "no default point" if args.no_default_point else "default point first"
    title = f"anytime curves, {args.seeds} seeds, {start_point} (median, IQR)"
    plot(runs, budget, args.png, title)
    print(f"\nanytime curves: {_shown(args.png)}")
    print(
        f"replay of a 100-trial {DEFAULT} search: {replay_100:.2f}s "
        f"({hundred.trials} trials); whole benchmark {time.perf_counter() - start:.1f}s"
    )
    print(
        "COMPUTE TO REACH RANDOM+FIFO BEST: "
        + " ".join(f"{n}={_fraction(f)}" for n, f in fractions.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
