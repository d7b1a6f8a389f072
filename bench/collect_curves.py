"""Record a learning-curve table from real dtlray training, for replaying searchers on it.

Trains a grid over a quickstart-like space -- backbone x fusion depth x stage-1 budget
(``stage1.epochs``) x finetune ``lr`` x ``lr_mult_backbone`` -- with dtlray's own worker loop
(``run_worker``, exactly what a one-worker search trial runs) and records, for every
configuration and finetune epoch, the target val and test accuracy (mean and per task), the
stage-1 compute the configuration needed, and the measured costs: the wall of every finetune
epoch (train pass + validation + report) and the trial's own set-up in its process.

Each stage-1 configuration is one job: compute its stage 1 (stored in ``--work-dir``), then run
its finetune grid from it. Jobs run ``--jobs`` at a time, one process and one torch thread each
(a quickstart trial's 0.9-CPU worker). Every finished finetune is appended to
``<out>/records/<job>.jsonl`` at once, so an interrupted collection continues where it stopped
(the stage-1 results stay in ``--work-dir``); the table ``<out>/curves.parquet`` is rebuilt
from the records at the end (``--table-only`` rebuilds it from what exists).

    .venv/bin/python bench/collect_curves.py            # the full grid, ~1 h on 2 cores
    .venv/bin/python bench/collect_curves.py --quick    # a 2-job smoke run, ~3 min
    .venv/bin/python bench/collect_curves.py --schedule wsd   # the stage tree's table

``--schedule wsd`` records the same grid with a warmup-stable-decay stage 1 (the two-axis search's
schedule) into ``bench/curves-wsd``, and measures the stage tree as it goes: the budgets of one
backbone x fusion depth run in one job, shortest first, so each continues the constant phase the
one before it stored (WSD decays per step, so even a 1-epoch budget stores its first 0.75
epochs), and its record says how many stage-1 epochs it reused and what the rest (the
continuation and its own decay) cost. ``bench/curves-wsd-epochwise`` holds the 56 records of
an earlier collection whose WSD changed its rate per epoch (a 1-epoch budget was all decay):
they describe a schedule dtlray no longer trains, so they are kept apart, not resumed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE = ROOT / "search_spaces" / "quickstart_asha.yaml"
BACKBONES = ("resnet18", "vgg11_bn")
FUSION_DEPTHS = (0, 1)
STAGE1_EPOCHS = (1, 2, 4)
# Log-spaced over the quickstart's ranges (stage2.lr 0.002..0.1, lr_mult_backbone 0.03..1).
LRS = (0.002, 0.0053, 0.014, 0.038, 0.1)
LR_MULTS = (0.03, 0.095, 0.31, 1.0)
QUICK = {
    "backbones": ("resnet18",),
    "depths": (0,),
    "stage1_epochs": (1,),
    "lrs": (0.014, 0.1),
    "lr_mults": (0.31,),
    "source_max_rows": 1024,
    "stage2_epochs": 3,
}


def job_name(backbone: str, depth: int, s1_epochs: int) -> str:
    return f"{backbone}-d{depth}-s{s1_epochs}"


def wsd_order(budget: int) -> tuple[bool, int]:
    """Where a budget goes in its configuration's chain: shortest first, but one with no
    constant phase to store or continue (all decay) last."""
    from dtlray.config import TrialConfig

    stage1 = TrialConfig.from_flat({"stage1.schedule": "wsd", "stage1.epochs": budget}).stage1
    return (stage1.constant_epochs == 0, budget)


def run_chain(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Jobs of one stage-1 configuration, one budget after the other in this process (``wsd``:
    each continues the constant phase the shorter one stored)."""
    results = [run_job(job) for job in jobs]
    return {
        "job": "+".join(r["job"] for r in results),
        "ran": sum(r["ran"] for r in results),
        "seconds": sum(r["seconds"] for r in results),
    }


def grid_config(space: Any, job: dict[str, Any], lr: float, mult: float) -> Any:
    """The trial config of one grid point (a job's stage-1 config with finetune lr and mult)."""
    sampled = {
        "model.backbone": job["backbone"],
        "model.fusion_depth": job["depth"],
        "stage2.lr": lr,
        "stage2.lr_mult_backbone": mult,
    }
    base = space.trial_config(sampled)
    flat = {
        **base.to_flat(),
        "stage1.epochs": job["stage1_epochs"],
        "resources.use_gpu": False,
        "resources.checkpoint": "end",
        # The whole source val split, as the tables were recorded (the quickstart now validates
        # stage 1 on a subset): the recorded stage-1 costs stay comparable across records.
        "data.source_val_max_rows": None,
        **job["overrides"],
    }
    return type(base).from_flat(flat)


class Recorder:
    """The worker loop's session: the splits in memory; every report kept with its time."""

    def __init__(self, datasets: dict[str, Any], reports: list[tuple[float, dict[str, Any]]]):
        self._datasets, self._reports = datasets, reports

    def dataset(self, key: str) -> Any:
        return self._datasets[key]

    def checkpoint(self) -> None:
        return None  # a collection run starts fresh

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self._reports.append((time.perf_counter(), dict(metrics)))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One stage-1 configuration: its stage 1, then every finetune of the grid not yet recorded.

    Runs in its own process. Returns ``{"job": name, "ran": n, "seconds": s}``.
    """
    import torch

    from dtlray.search_space import load_space
    from dtlray.train_loop import run_worker
    from dtlray.trial import plan_trial

    torch.set_num_threads(1)
    records = Path(job["records"])
    # The worker loop's per-epoch lines go to the job's log; the collection's own lines to stderr.
    log_dir = Path(job["work_dir"]) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout = (log_dir / f"{job['name']}.log").open("a", buffering=1)
    done = {(r["lr"], r["lr_mult_backbone"]) for r in read_records(records)}
    space = load_space(job["space"])
    start_job = time.perf_counter()
    ran = 0
    parent = os.getppid()
    for lr, mult in job["finetunes"]:
        if (lr, mult) in done:
            continue
        if os.getppid() != parent:  # the collection was killed: stop, do not train unseen
            break
        cfg = grid_config(space, job, lr, mult)
        reports: list[tuple[float, dict[str, Any]]] = []
        start = time.perf_counter()
        trial = plan_trial(cfg, storage_path=job["work_dir"], run_test=True, in_process=True)
        plan = replace(trial.plan, test_every_epoch=True)
        worker_config = {"trial": cfg.to_dict(), "plan": plan.to_dict()}
        run_worker(worker_config, Recorder(trial.datasets, reports), device=torch.device("cpu"))
        record = _record(job, cfg, start, reports)
        with records.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        ran += 1
        last = record["epochs"][-1]
        print(
            f"[collect] {job['name']} lr={lr:g} mult={mult:g}: val {last['val_acc']:.4f} "
            f"test {last['test_acc']:.4f} ({record['trial_seconds']:.1f}s, stage 1 "
            f"{record['stage1_mode']})",
            file=sys.stderr,
            flush=True,
        )
    return {"job": job["name"], "ran": ran, "seconds": time.perf_counter() - start_job}


def _record(
    job: dict[str, Any], cfg: Any, start: float, reports: list[tuple[float, dict[str, Any]]]
) -> dict[str, Any]:
    """One finetune as a JSON-able record: the configuration, costs and per-epoch accuracies."""
    from dtlray.metrics import DIVERGED_METRIC

    first = reports[0][1]
    times = [start] + [t for t, _ in reports]
    walls = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    # Epoch 1's wall is not separable from the set-up before it: take the later epochs' median.
    epoch_wall = sorted(walls)[len(walls) // 2] if walls else reports[0][1]["train/epoch_seconds"]
    stage1_here = float(first.get("stage1/seconds", 0.0))
    tasks = list(cfg.data.targets)
    epochs = []
    nan = float("nan")
    for i, (_, m) in enumerate(reports):
        # A diverged run's last report has NaN validation metrics and no test ones.
        epochs.append(
            {
                "epoch": int(m["epoch"]),
                "diverged": bool(m.get(DIVERGED_METRIC, False)),
                "val_acc": float(m["target/val_acc"]),
                "test_acc": float(m.get("target/test_acc", nan)),
                "train_loss": float(m["train/loss"]),
                "train_seconds": float(m["train/epoch_seconds"]),
                "wall_seconds": walls[i - 1] if i > 0 else epoch_wall,
                **{f"{t}/val_acc": float(m[f"target/{t}/val_acc"]) for t in tasks},
                **{f"{t}/test_acc": float(m.get(f"target/{t}/test_acc", nan)) for t in tasks},
            }
        )
    return {
        "backbone": job["backbone"],
        "fusion_depth": job["depth"],
        "stage1_epochs": job["stage1_epochs"],
        "lr": cfg.stage2.lr,
        "lr_mult_backbone": cfg.stage2.lr_mult_backbone,
        "stage1_mode": first.get("stage1/mode", "diverged"),
        "stage1_compute_seconds": float(first.get("stage1/compute_seconds", float("nan"))),
        # wsd: the stored constant-phase epochs this budget continued (0: from scratch); its
        # stage1/seconds is then what the continuation and its decay cost.
        "stage1_reused_epochs": float(first.get("stage1/reused_epochs", 0)),
        "stage1_seconds": stage1_here,
        "source_val_acc": float(first.get("source/val_acc", float("nan"))),
        # In-process set-up (plan, datasets, model, loading stage 1) -- the trial's own fixed
        # cost; Tune's per-trial cost around it is measured by bench/train_overhead.py.
        "setup_seconds": max(
            0.0,
            reports[0][0]
            - start
            - epoch_wall
            - (stage1_here if first.get("stage1/mode") == "computed" else 0.0),
        ),
        "stage1_load_seconds": stage1_here if first.get("stage1/mode") == "reused" else 0.0,
        "trial_seconds": reports[-1][0] - start,
        "epochs": epochs,
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    """The finished finetunes of one job; a line cut short by an interruption is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def build_table(out: Path, meta: dict[str, Any]) -> Path | None:
    """``curves.parquet``: one row per (configuration, finetune epoch), from every record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((out / "records").glob("*.jsonl")):
        for rec in read_records(path):
            head = {k: v for k, v in rec.items() if k != "epochs"}
            rows.extend({**head, **ep} for ep in rec["epochs"])
    if not rows:
        return None
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({"dtlray_curves": json.dumps(meta)})
    target = out / "curves.parquet"
    tmp = target.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(target)  # never a half-written table
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: bench/curves[-wsd]")
    parser.add_argument(
        "--schedule",
        choices=("cosine", "wsd"),
        default="cosine",
        help="stage 1's learning-rate schedule (wsd: the stage tree's, budgets in one job)",
    )
    parser.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "dtlray-curves"),
        help="where the stage-1 results are stored (kept for a resumed collection)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (one core each)")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, to check it runs")
    parser.add_argument("--table-only", action="store_true", help="only rebuild curves.parquet")
    args = parser.parse_args(argv)

    grid: dict[str, Any] = {
        "backbones": BACKBONES,
        "depths": FUSION_DEPTHS,
        "stage1_epochs": STAGE1_EPOCHS,
        "lrs": LRS,
        "lr_mults": LR_MULTS,
    }
    overrides: dict[str, Any] = {}
    if args.schedule == "wsd":
        overrides["stage1.schedule"] = "wsd"
    if args.quick:
        # wsd: budgets 2 and 4, so the second continues the constant epoch the first stored.
        grid = QUICK | ({"stage1_epochs": (2, 4)} if args.schedule == "wsd" else {})
        overrides |= {
            "data.source_max_rows": QUICK["source_max_rows"],
            "stage2.epochs": QUICK["stage2_epochs"],
        }
        if args.out is None:
            args.out = Path(args.work_dir) / f"quick-table-{args.schedule}"
        args.work_dir = str(Path(args.work_dir) / "quick")
    if args.out is None:
        args.out = ROOT / "bench" / ("curves-wsd" if args.schedule == "wsd" else "curves")
    (args.out / "records").mkdir(parents=True, exist_ok=True)
    import torch

    meta = {
        "space": str(SPACE.relative_to(ROOT)),
        "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
        "overrides": overrides,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__,
        "threads_per_job": 1,
        "jobs_at_a_time": args.jobs,
        "stage1_schedule": args.schedule,
    }
    if not args.table_only:
        finetunes = list(itertools.product(grid["lrs"], grid["lr_mults"]))
        jobs = []
        # Longest stage 1 first, so the last jobs to finish are short ones.
        for s1, backbone, depth in itertools.product(
            sorted(grid["stage1_epochs"], reverse=True), grid["backbones"], grid["depths"]
        ):
            name = job_name(backbone, depth, s1)
            jobs.append(
                {
                    "name": name,
                    "backbone": backbone,
                    "depth": depth,
                    "stage1_epochs": s1,
                    "finetunes": finetunes,
                    "records": str(args.out / "records" / f"{name}.jsonl"),
                    "space": str(SPACE),
                    "work_dir": args.work_dir,
                    "overrides": overrides,
                }
            )
        total = len(jobs) * len(finetunes)
        have = sum(len(read_records(Path(j["records"]))) for j in jobs)
        print(
            f"[collect] {len(jobs)} stage-1 configs x {len(finetunes)} finetunes = {total} "
            f"runs; {have} already recorded; {args.jobs} at a time",
            flush=True,
        )
        start = time.perf_counter()
        # spawn: a fresh interpreter per job process (torch and fork do not mix well).
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            if args.schedule == "wsd":  # one chain per configuration, shortest budget first
                chains: dict[tuple[str, int], list[dict[str, Any]]] = {}
                for job in sorted(jobs, key=lambda j: wsd_order(j["stage1_epochs"])):
                    chains.setdefault((job["backbone"], job["depth"]), []).append(job)
                futures = [pool.submit(run_chain, chain) for chain in chains.values()]
            else:
                futures = [pool.submit(run_job, job) for job in jobs]
            for future in as_completed(futures):
                result = future.result()
                have = sum(len(read_records(Path(j["records"]))) for j in jobs)
                elapsed = time.perf_counter() - start
                print(
                    f"[collect] job {result['job']} done ({result['ran']} runs, "
                    f"{result['seconds']:.0f}s); {have}/{total} recorded, {elapsed:.0f}s "
                    "elapsed",
                    flush=True,
                )
        meta["collect_wall_seconds"] = round(time.perf_counter() - start, 1)
        meta["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    table = build_table(args.out, meta)
    print(f"[collect] table: {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
