"""What a dtlray search costs beyond its trials' own work, and what stage-1 reuse saves.

Runs, in one process on one private local Ray (started by :func:`dtlray.trial.init_ray`):

* **(a) search overhead**: a search of ``--trials`` trials (FIFO, so every trial runs its full
  length; ``--slots`` trials at a time, one 1-thread worker each) on the tiny space's data, with
  stage-1 reuse off so that no trial waits for another's stage 1 and every trial's time is its
  own work. Each trial's own time is Tune's ``time_total_s`` of its last result: the trial
  function from its start (stage-1 claim, ``build_trainer``, ``TorchTrainer`` start-up, both
  stages) up to its last report. The ratio is ``wall / (sum(time_total_s) / slots)``: 1.0 means
  the slots were always busy with trial work; above 1.0 is what Tune and Train add between
  trials (trial actor start and stop, the Train run's shutdown after its last report, Tune's
  scheduling). Goal: at most 1.2.
* **(b) stage-1 reuse**: ``--reuse-trials`` trials over 4 distinct stage-1 configs
  (``model.fusion_depth`` in 0..3, each a distinct stage-1 key) crossed with a finetune setting
  (``stage2.lr``, 4 values), run twice with the same sampled configurations: reuse on, then reuse
  off (``build_tuner(reuse_stage1=False)``: every trial pretrains for itself). Pretrain runs are
  counted twice, from the trials' ``stage1/cache_hit`` (a miss is a pretrain run) and from the
  stage-1 results stored on disk; the two must agree, and with reuse on they must equal the
  number of distinct stage-1 configs sampled (goal: exactly 4). Total compute is the sum of the
  trials' ``time_total_s`` (slot-seconds) and the search's wall time, reuse on / reuse off.

The searcher is Optuna's random sampler with the first seed (from 0) whose sequence of
configurations puts the same number of trials on each fusion depth; the first trial is the space's
defaults, as in every dtlray search. The script finds that seed before Ray starts by asking the
same searcher, so the run is reproducible and balanced by construction, and checks afterwards
which configurations actually ran.

Trial start and end times come from Tune's result timestamps (whole seconds), so the breakdown
of the idle slot-seconds is good to about a second per trial; the ratios use ``time_total_s``
and a ``time.perf_counter`` wall clock. Other work on the machine shows directly in the numbers:
the load average is printed at the start, between parts and at the end.

Run from the repository root (40 trials of about a minute on 2 slots: 20-25 minutes on 2 idle
cores, measured 33 minutes on a loaded machine; ``--quick``, 20 trials, about half that)::

    .venv/bin/python bench/search_costs.py
    .venv/bin/python bench/search_costs.py --quick       # smoke run: 4 trials, 8 over 4 configs
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
import yaml

import dtlray
from dtlray.data import load_info, prepare_builtin
from dtlray.experiment import STAGE1_CACHE_DIR as CACHE_DIR
from dtlray.ray_session import init_ray
from dtlray.report.records import TrialRecord
from dtlray.search import derive_max_concurrent_trials
from dtlray.search_space import SearchSpace, parse_space
from dtlray.search_trial import TRIAL_DRIVER_CPU
from dtlray.searcher import build_searcher
from dtlray.stage1_cache import RECORD_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = REPO_ROOT / "search_spaces" / "tiny.yaml"
FUSION_DEPTHS = [0, 1, 2, 3]  # each depth is a distinct stage-1 key
FINETUNE_LRS = [0.003, 0.01, 0.03, 0.1]  # stage 2 only: shares the stage-1 key
MAX_SEED = 10_000


# -- configuration ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="(a): trials in the search")
    parser.add_argument(
        "--reuse-trials",
        type=int,
        default=16,
        help=f"(b): trials over {len(FUSION_DEPTHS)} stage-1 configs (a multiple of "
        f"{len(FUSION_DEPTHS)})",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=2,
        help="max_concurrent_trials (dtlray caps it to what the Ray's CPUs fit)",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private local Ray")
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="resources.cpus_per_worker (default: tiny.yaml's, which fits 2 trials on 2 CPUs)",
    )
    parser.add_argument(
        "--source-max-rows",
        type=int,
        default=2048,
        help="(b): source rows pretrained on, so stage 1 weighs against a trial's fixed cost",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: --trials 4 --reuse-trials 8"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="prepared data root (default: built-in datasets prepared in a temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.reuse_trials = 4, 8
    if args.trials < 1 or args.slots < 1:
        parser.error("--trials and --slots must be at least 1")
    if args.reuse_trials < len(FUSION_DEPTHS) or args.reuse_trials % len(FUSION_DEPTHS):
        parser.error(f"--reuse-trials must be a positive multiple of {len(FUSION_DEPTHS)}")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        parser.error("--cpus-per-worker must be positive")
    return args


def tiny_raw(args: argparse.Namespace, data_root: str) -> dict[str, Any]:
    """tiny.yaml as a mapping, on ``data_root``, one worker per trial, FIFO, ``slots`` at once.

    tiny.yaml gives a worker 0.9 CPU so that two trials (worker + ``TRIAL_DRIVER_CPU`` for the
    Tune function each) fit on 2 CPUs; the worker runs one torch thread either way.
    """
    raw = yaml.safe_load(TINY_SPACE.read_text())
    raw["trial"]["data"]["root"] = data_root
    resources = raw["trial"].setdefault("resources", {})
    resources.update(num_workers=1, use_gpu=False)
    resources["max_failures"] = 0  # a failed run is a failed benchmark, not a retry
    if args.cpus_per_worker is not None:
        resources["cpus_per_worker"] = args.cpus_per_worker
    raw["scheduler"] = {"type": "fifo"}  # every trial runs its full length
    raw["max_concurrent_trials"] = args.slots
    return raw


def overhead_space(args: argparse.Namespace, data_root: str) -> SearchSpace:
    """(a): the tiny space's search (TPE, seed 0) over ``--trials`` trials."""
    raw = tiny_raw(args, data_root)
    raw["num_samples"] = args.trials
    return parse_space(raw, source="<search-costs:a>")


def reuse_space(args: argparse.Namespace, data_root: str, seed: int) -> SearchSpace:
    """(b): 4 fusion depths (4 stage-1 keys) x 4 finetune learning rates, random sampler."""
    raw = tiny_raw(args, data_root)
    raw["trial"]["data"]["source_max_rows"] = args.source_max_rows
    raw["trial"]["stage1"]["epochs"] = 1
    raw["search"] = {
        "model.fusion_depth": {"choices": FUSION_DEPTHS},
        "stage2.lr": {"choices": FINETUNE_LRS},
    }
    raw["searcher"] = {"type": "random", "seed": seed}
    raw["num_samples"] = args.reuse_trials
    return parse_space(raw, source="<search-costs:b>")


def balanced_seed(args: argparse.Namespace, data_root: str) -> tuple[int, list[dict[str, Any]]]:
    """The first sampler seed whose configurations hit every fusion depth equally often.

    Asks dtlray's own searcher, built as :func:`dtlray.build_tuner` builds it, for the search's
    configurations in order (Tune asks it the same way, one trial at a time).
    """
    per_depth = args.reuse_trials // len(FUSION_DEPTHS)
    for seed in range(MAX_SEED):
        searcher = build_searcher(reuse_space(args, data_root, seed), study_name="seed-probe")
        configs = [searcher.suggest(f"probe{i}") for i in range(args.reuse_trials)]
        counts = Counter(c["model.fusion_depth"] for c in configs)
        if all(counts[d] == per_depth for d in FUSION_DEPTHS):
            return seed, configs
    raise RuntimeError(f"no seed below {MAX_SEED} balances {args.reuse_trials} trials")


# -- running a search ---------------------------------------------------------------------------


@dataclass
class TrialTime:
    """One trial as Tune recorded it (times are ``time.time()``, whole seconds at the end)."""

    trial_id: str
    config: dict[str, Any]
    start: float  # first result's timestamp minus its time_this_iter_s
    end: float  # last result's timestamp
    total_s: float  # time_total_s of the last result
    cache_hit: bool | None
    stage1_compute_s: float
    useful_s: float  # stage 1 it computed itself + its finetune train passes


@dataclass
class SearchRun:
    """What one search measured."""

    label: str
    space: SearchSpace
    experiment: Path
    storage: Path
    slots: int  # trials at a time: max_concurrent_trials as dtlray capped it
    fit_start: float  # time.time()
    wall: float  # time.perf_counter() around tuner.fit()
    trials: list[TrialTime]
    errors: list[str]

    @property
    def busy(self) -> float:
        """Slot-seconds of trial work: the sum of the trials' ``time_total_s``."""
        return sum(t.total_s for t in self.trials)

    @property
    def useful(self) -> float:
        """Seconds that trained something: computed stage 1s and finetune train passes."""
        return sum(t.useful_s for t in self.trials)

    def efficiency(self) -> float:
        """Slot-seconds the search held over its useful work (1.0 = every slot-second trained)."""
        return self.wall * self.slots / self.useful if self.useful else math.nan

    @property
    def pretrain_runs(self) -> int:
        """Trials that computed stage 1 themselves (``stage1/cache_hit`` false)."""
        return sum(1 for t in self.trials if t.cache_hit is False)

    def stored_stage1(self) -> int:
        """Complete stage-1 results on disk: the shared cache, or each trial's own without reuse."""
        shared = list((self.storage / CACHE_DIR).glob(f"*/{RECORD_FILE}"))
        private = list((self.experiment / "no-reuse").glob(f"*/{CACHE_DIR}/*/{RECORD_FILE}"))
        return len(shared) + len(private)

    def distinct_stage1(self) -> int:
        """Distinct stage-1 keys among the configurations that ran."""
        source = self.space.trial.data
        fingerprint = load_info(source.source, source.root).fingerprint
        return len({self.space.trial_config(t.config).stage1_key(fingerprint) for t in self.trials})


def run_search(
    label: str, space: SearchSpace, storage: Path, name: str, reuse_stage1: bool
) -> SearchRun:
    """Build the tuner as ``dtlray tune`` does, fit it, and collect every trial's times."""
    tuner = dtlray.build_tuner(
        space,
        storage_path=str(storage),
        name=name,
        study_storage=None,
        reuse_stage1=reuse_stage1,
    )
    slots = derive_max_concurrent_trials(space)  # what build_tuner gave Tune
    res = space.trial.resources
    print(
        f"\n== {label}: {space.num_samples} trials, {slots} at a time (1 worker of "
        f"{res.cpus_per_worker} CPU + {TRIAL_DRIVER_CPU} CPU Tune driver each) =="
    )
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    fit_start = time.time()
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start

    trials, errors = [], []
    for result in results:
        if result.error is not None:
            errors.append(f"{result.config}: {result.error!r}"[:500])
        history = result.metrics_dataframe
        if history is None or history.empty:
            continue
        first, last = history.iloc[0], result.metrics
        searched = {k: result.config[k] for k in space.search}
        trials.append(
            TrialTime(
                trial_id=str(last["trial_id"]),
                config=searched,
                start=float(first["timestamp"]) - float(first["time_this_iter_s"]),
                end=float(last["timestamp"]),
                total_s=float(last["time_total_s"]),
                cache_hit=last.get("stage1/cache_hit"),
                stage1_compute_s=float(last.get("stage1/compute_seconds", 0.0)),
                useful_s=TrialRecord(
                    str(last["trial_id"]), 0, searched, tuple(history.to_dict("records")), ""
                ).useful_seconds,
            )
        )
    trials.sort(key=lambda t: t.start)
    return SearchRun(
        label=label,
        space=space,
        experiment=Path(results.experiment_path),
        storage=storage,
        slots=slots,
        fit_start=fit_start,
        wall=wall,
        trials=trials,
        errors=errors,
    )


# -- output -------------------------------------------------------------------------------------


@dataclass
class SlotGaps:
    """Where the idle slot-seconds went (estimates from whole-second timestamps)."""

    head: list[float]  # search start -> a slot's first trial starts
    handoffs: list[float]  # a trial's last report -> the next trial on that slot starts
    tail: list[float]  # a slot's last trial reports -> the search returns
    max_overlap: int


def slot_gaps(run: SearchRun) -> SlotGaps:
    """Assign trials to slots in start order (a trial takes the slot freed first) and measure
    the gaps between one trial's last report and the next trial's start on the same slot."""
    free: list[float] = []  # end times of the trials holding a slot
    head, handoffs = [], []
    for trial in run.trials:
        if len(free) < run.slots:
            head.append(max(0.0, trial.start - run.fit_start))
        else:
            handoffs.append(trial.start - heapq.heappop(free))
        heapq.heappush(free, trial.end)
    fit_end = run.fit_start + run.wall
    tail = [max(0.0, fit_end - end) for end in free]
    edges = sorted([(t.start, 1) for t in run.trials] + [(t.end, -1) for t in run.trials])
    running = max_overlap = 0
    for _, step in edges:
        running += step
        max_overlap = max(max_overlap, running)
    return SlotGaps(head=head, handoffs=handoffs, tail=tail, max_overlap=max_overlap)


def print_trials(run: SearchRun) -> None:
    """One line per trial: when it ran (from the search's start) and what it cost."""
    print(f"\n{run.label}: trials (times in s from the search's start)")
    print(f"{'trial':<8}{'start':>8}{'end':>8}{'own time':>10}{'stage 1':>12}  searched")
    for t in run.trials:
        stage1 = {True: "loaded", False: "computed", None: "-"}[t.cache_hit]
        print(
            f"{t.trial_id:<8}{t.start - run.fit_start:>8.0f}{t.end - run.fit_start:>8.0f}"
            f"{t.total_s:>10.1f}{stage1:>12}  {t.config}"
        )
    for error in run.errors:
        print(f"  FAILED {error}")


def overhead_ratio(run: SearchRun) -> float:
    """``wall / (sum of the trials' time_total_s / slots)``: 1.0 = the slots never idled."""
    return run.wall / (run.busy / run.slots) if run.busy else math.nan


def print_overhead(run: SearchRun) -> float:
    """(a): the ratio and what the slots were doing; returns the ratio."""
    print_trials(run)
    slots = run.slots
    busy, capacity = run.busy, run.wall * slots
    ratio = overhead_ratio(run)
    gaps = slot_gaps(run)
    print(f"\n(a) search overhead, {len(run.trials)} trials on {slots} slots")
    print(f"  search wall (tuner.fit)                       {run.wall:8.1f} s")
    print(f"  slot-seconds available (wall x {slots})            {capacity:8.1f}")
    print(f"  slot-seconds of trial work (sum time_total_s) {busy:8.1f}")
    print(
        f"  idle slot-seconds                             {capacity - busy:8.1f}"
        f"  ({(capacity - busy) / capacity:.0%} of the slots' time)"
    )
    print(
        f"    before each slot's first trial starts     {sum(gaps.head):8.1f}"
        f"  [{', '.join(f'{g:.0f}' for g in gaps.head)}]"
    )
    if gaps.handoffs:
        print(
            f"    between trials on a slot                  {sum(gaps.handoffs):8.1f}"
            f"  ({len(gaps.handoffs)} hand-offs, median {statistics.median(gaps.handoffs):.1f} s:"
            " Train shutdown after the last report, actor stop and start)"
        )
    print(
        f"    after each slot's last trial reports      {sum(gaps.tail):8.1f}"
        f"  [{', '.join(f'{g:.0f}' for g in gaps.tail)}]"
    )
    print(f"  most trials running at once: {gaps.max_overlap} (slots: {slots})")
    print(
        f"RATIO (a) wall / (sum of trials' own time / slots) = {run.wall:.1f} / "
        f"({busy:.1f} / {slots}) = {ratio:.2f}x  (goal <= 1.2; 1.0 = slots always busy with "
        "trial work)"
    )
    return ratio


def print_reuse(on: SearchRun, off: SearchRun) -> None:
    """(b): pretrain runs counted two ways, and total compute, reuse on vs off."""
    print_trials(on)
    print_trials(off)
    configs = on.distinct_stage1()
    print(f"\n(b) stage-1 reuse, {len(on.trials)} trials over {configs} stage-1 configs")
    print(f"{'':<44}{'reuse on':>12}{'reuse off':>12}{'on / off':>10}")
    rows: list[tuple[str, float, float, str]] = [
        ("distinct stage-1 configs sampled", on.distinct_stage1(), off.distinct_stage1(), "d"),
        ("pretrain runs (trials with cache_hit false)", on.pretrain_runs, off.pretrain_runs, "d"),
        ("pretrain runs (stage-1 results on disk)", on.stored_stage1(), off.stored_stage1(), "d"),
        (
            "stage-1 compute, s (sum over pretrain runs)",
            sum(t.stage1_compute_s for t in on.trials if t.cache_hit is False),
            sum(t.stage1_compute_s for t in off.trials if t.cache_hit is False),
            ".1f",
        ),
        ("total compute, s (sum of time_total_s)", on.busy, off.busy, ".1f"),
        ("search wall, s", on.wall, off.wall, ".1f"),
    ]
    for name, a, b, fmt in rows:
        ratio = f"{a / b:10.2f}" if b else f"{'-':>10}"
        print(f"{name:<44}{a:>12{fmt}}{b:>12{fmt}}{ratio}")


def check_reuse(on: SearchRun, off: SearchRun) -> list[str]:
    """What (b) requires: counts that agree, one pretrain per distinct config, same configs."""
    problems = []
    for run in (on, off):
        if run.pretrain_runs != run.stored_stage1():
            problems.append(
                f"{run.label}: {run.pretrain_runs} trials computed stage 1 but "
                f"{run.stored_stage1()} results are stored"
            )
        if len(run.trials) != run.space.num_samples or run.errors:
            problems.append(
                f"{run.label}: {len(run.trials)} of {run.space.num_samples} trials reported, "
                f"{len(run.errors)} failed"
            )
    if on.pretrain_runs != on.distinct_stage1():
        problems.append(
            f"reuse on: {on.pretrain_runs} pretrain runs for {on.distinct_stage1()} distinct "
            "stage-1 configs (goal: equal)"
        )
    if off.pretrain_runs != len(off.trials):
        problems.append(
            f"reuse off: {off.pretrain_runs} pretrain runs for {len(off.trials)} trials (goal: all)"
        )
    if sorted(map(repr, (t.config for t in on.trials))) != sorted(
        map(repr, (t.config for t in off.trials))
    ):
        problems.append("reuse on and off ran different configurations")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare data, find the balanced seed, run (a), (b) reuse on, (b) reuse off; report."""
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    script_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtlray-bench-") as tmp:
        data_root = args.data_root or os.path.join(tmp, "data")
        if args.data_root is None:
            for name in ("fashion-mnist", "digits", "faces"):
                prepare_builtin(name, data_root)
        seed, configs = balanced_seed(args, data_root)
        a_space = overhead_space(args, data_root)
        on_space = reuse_space(args, data_root, seed)
        off_space = reuse_space(args, data_root, seed)

        print(
            f"torch {torch.__version__} | ray {ray.__version__} | optuna {optuna.__version__} | "
            f"python {platform.python_version()} | {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0))} usable) | load average {os.getloadavg()[0]:.2f}"
        )
        print(f"private Ray with {args.num_cpus} CPUs, max_concurrent_trials {args.slots}")
        print(
            f"(a) {args.trials} trials of tiny.yaml (source_max_rows "
            f"{a_space.trial.data.source_max_rows}, stage 1 {a_space.trial.stage1.epochs} epoch, "
            f"stage 2 {a_space.trial.stage2.epochs} epochs), reuse off, FIFO"
        )
        depths = Counter(c["model.fusion_depth"] for c in configs)
        print(
            f"(b) {args.reuse_trials} trials, source_max_rows {args.source_max_rows}, random "
            f"sampler seed {seed} (first balanced seed): fusion depth counts "
            f"{dict(sorted(depths.items()))}, "
            f"{len({tuple(c.items()) for c in configs})} distinct configurations"
        )

        init_ray(None, num_cpus=args.num_cpus)
        try:
            storage = Path(tmp)
            overhead = run_search(
                "(a) overhead", a_space, storage / "a", "overhead", reuse_stage1=False
            )
            on = run_search("(b) reuse on", on_space, storage / "b-on", "reuse-on", True)
            off = run_search("(b) reuse off", off_space, storage / "b-off", "reuse-off", False)
        finally:
            ray.shutdown()

        print("\n" + "=" * 100)
        ratio_a = print_overhead(overhead)
        print_reuse(on, off)
        problems = check_reuse(on, off)
        if overhead.errors or len(overhead.trials) != args.trials:
            problems.append(f"(a): {len(overhead.trials)} of {args.trials} trials reported")

        total = time.perf_counter() - script_start
        compute_ratio = on.busy / off.busy if off.busy else math.nan
        wall_ratio = on.wall / off.wall if off.wall else math.nan
        print("\nSUMMARY")
        print(
            f"  (a) {len(overhead.trials)} trials on {overhead.slots} slots: wall "
            f"{overhead.wall:.0f} s / (sum of trials' time_total_s {overhead.busy:.0f} s / "
            f"{overhead.slots}) = {ratio_a:.2f}x (goal <= 1.2x); the same ratio over (b)'s "
            f"reuse-off search ({len(off.trials)} trials, also FIFO without reuse): "
            f"{overhead_ratio(off):.2f}x"
        )
        print(
            f"  (b) {len(on.trials)} trials over {on.distinct_stage1()} distinct stage-1 configs: "
            f"pretrain runs {on.pretrain_runs} (cache_hit) / {on.stored_stage1()} (on disk), "
            f"goal {on.distinct_stage1()}; reuse off: {off.pretrain_runs} / "
            f"{off.stored_stage1()}"
        )
        print(
            f"  (b) total compute reuse on / off: {on.busy:.0f} s / {off.busy:.0f} s = "
            f"{compute_ratio:.2f}x (sum of time_total_s); wall {on.wall:.0f} s / "
            f"{off.wall:.0f} s = {wall_ratio:.2f}x"
        )
        print(
            f"  useful work (computed stage 1s + finetune train passes): (a) "
            f"{overhead.useful:.0f} s of {overhead.wall * overhead.slots:.0f} slot-s, (b) reuse "
            f"on {on.useful:.0f} s of {on.wall * on.slots:.0f} slot-s"
        )
        print(
            f"  checks: {'all passed' if not problems else '; '.join(problems)} | script "
            f"{total / 60:.1f} min | load average {os.getloadavg()[0]:.2f} at the end "
            "(other work on this machine)"
        )
        # The headline: (b) reuse on is a real search (shared stage 1, as dtlray tune runs).
        print(f"USEFUL-WORK EFFICIENCY = {on.efficiency():.2f}  (slot-seconds / useful work)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
