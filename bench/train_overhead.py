"""What dtlray's Ray Train epoch loop costs against a plain PyTorch loop doing the same work.

Measures, in one run on this machine:

* **plain**: a single-process PyTorch loop (no Ray) over the same model, the same target data
  with the same label budget, the same per-step batching (every step takes from each target a
  share proportional to its size), the same loss, optimiser, thread count and memory layout
  (``resources.channels_last``, on by default; ``--nchw`` runs both sides in NCHW). It runs twice,
  before Ray starts and after it stops, so drift in machine load shows as a gap between the two.
* **dtlray**: a real stage-2 trial (``stage2.init: scratch``, so no stage 1; one worker) built by
  :func:`dtlray.trial.build_trainer` and run by :func:`dtlray.trial.run_trainer` on a private
  local Ray. Every report is collected by a Ray Train callback on the controller.

How to read the output:

* The samples/s columns compare the **train pass of an epoch only**: dtlray's
  ``train/samples_per_s`` does not count validation, checkpointing or reporting, and the plain
  loop does none of those. Epoch 1 is warm-up and excluded on both sides; the ratio is
  ``median(dtlray) / median(plain)`` over the remaining epochs (plain pools both of its runs).
  The goal is a ratio of at least 0.95. The train losses of the last epoch should agree closely:
  both sides start from the same weights and see the same batches in the same order.
* The **fixed cost** is what a trial pays whatever its length: the driver's ``build_trainer``,
  the start-up before epoch 1 (controller, worker group, dataset hand-off, model build) and the
  tail after the last report (controller poll, worker-group shutdown). Start-up is the time from
  ``run_trainer`` to the worker's first report minus epoch 1's train pass and a typical epoch's
  non-train part (the median of later epochs). Worker-side report times are the modification
  times of each persisted checkpoint (written by the worker inside ``ray.train.report``); the
  controller only sees reports when it polls (every 2 s), which is too coarse for this.
* The per-epoch part outside the train pass (validation, checkpoint save and upload, report) is
  printed on its own: it is paid every epoch, but neither side's samples/s includes it.
* **search trial**: the same trial as a one-trial ``dtlray tune`` search (FIFO) — what a search
  pays per trial, from ``tuner.fit()`` to its result (a one-worker trial runs the worker loop in
  its Tune trial). Then a search of 3 copies of it, one at a time: the later two run in the
  first one's trial process (Tune's ``reuse_actors``), and what each costs beyond its epochs is
  printed as the fixed cost of a later trial of a search. The last two lines are the headline,
  for the first trial in a fresh trial process: ``END-TO-END RATIO plain/dtlray`` (the
  plain loop's set-up plus the same epochs, the mean of its runs before and after Ray, over the
  search trial's wall; goal >= 0.85) and
  ``PER-EPOCH OVERHEAD`` (median time between two reports outside the train pass, as a share of
  the train pass; goal <= 5%), with the share of it that is the validation pass itself
  (``val/epoch_seconds``).
* Above them, what a fresh interpreter takes to ``import torch, torchvision`` (median of 3, in
  subprocesses): the search trial's new process pays it inside its fixed cost, and a plain
  script pays it before its set-up, which the plain side's wall leaves out (it runs in this
  process, already imported). The line gives the ratio with it counted on both sides, and the
  fixed cost beyond it; the headline stays as defined.

Run from the repository root (2-6 minutes on 2 cores with the defaults)::

    .venv/bin/python bench/train_overhead.py
    .venv/bin/python bench/train_overhead.py --threads 2 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.nn.functional as F

from dtlray.config import TrialConfig
from dtlray.data import decode_uint8, load_info, prepare_builtin, read_split_table, to_model_input
from dtlray.models import TransferModel, build_transfer_model
from dtlray.ray_session import init_ray
from dtlray.search import build_tuner
from dtlray.search_space import load_space, parse_space
from dtlray.trial import build_trainer, run_trainer
from dtlray.trial_data import select_label_budget
from dtlray.worker import memory_format

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = REPO_ROOT / "search_spaces" / "tiny.yaml"
RUN_NAME = "train-overhead"
# Trials after the first in the repeated search (each runs in the first one's process).
REUSED_TRIALS = 2


# -- configuration ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--epochs", type=int, default=5, help="per side; the first is warm-up (excluded)"
    )
    parser.add_argument(
        "--samples-per-class", type=int, default=100, help="label budget applied to the targets"
    )
    parser.add_argument("--targets", default="digits,faces", help="comma-separated")
    parser.add_argument(
        "--data-root",
        default=None,
        help="prepared data root (default: built-in datasets prepared in a temporary directory)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads = resources.cpus_per_worker"
    )
    parser.add_argument(
        "--nchw",
        action="store_true",
        help="both sides in PyTorch's default layout (resources.channels_last=false)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is warm-up)")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def build_config(args: argparse.Namespace, data_root: str) -> TrialConfig:
    """The tiny space's trial with only stage 2 (from scratch) on one worker, sized by ``args``."""
    base = load_space(TINY_SPACE).trial_config()
    return TrialConfig.from_flat(
        {
            "data.root": data_root,
            "data.targets": [t.strip() for t in args.targets.split(",") if t.strip()],
            "data.image_size": args.image_size,
            "data.channels": args.channels,
            "model.backbone": args.backbone,
            "stage2.init": "scratch",
            "stage2.epochs": args.epochs,
            "stage2.batch_size": args.batch_size,
            "stage2.samples_per_class": args.samples_per_class,
            "resources.num_workers": 1,
            "resources.cpus_per_worker": float(args.threads),
            "resources.use_gpu": False,
            "resources.channels_last": not args.nchw,
            "resources.max_failures": 0,  # a failed run is a failed benchmark, not a retry
        },
        base=base,
    )


# -- the plain side -----------------------------------------------------------------------------


@dataclass
class TargetData:
    """One target's train rows after the label budget, decoded once (as the dtlray worker does)."""

    name: str
    num_classes: int
    images: torch.Tensor  # (N, C, H, W) uint8, stored size
    labels: torch.Tensor  # (N,) int64


@dataclass
class EpochStats:
    """The train pass of one epoch."""

    samples: int
    seconds: float
    loss: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def load_targets(cfg: TrialConfig) -> list[TargetData]:
    """The targets' train splits with the trial's label budget (same rows, same order)."""
    targets = []
    for name in cfg.data.targets:
        info = load_info(name, cfg.data.root)
        table = read_split_table(info, "train")
        keep = select_label_budget(
            table.column("label").to_numpy(),
            cfg.stage2.samples_per_class,
            cfg.stage2.train_fraction,
            cfg.seed,
        )
        table = table.take(keep)
        targets.append(
            TargetData(
                name=name,
                num_classes=info.num_classes,
                images=decode_uint8(table.column("image"), info.image_shape),
                labels=torch.from_numpy(table.column("label").to_numpy().astype(np.int64)),
            )
        )
    return targets


def build_model(cfg: TrialConfig, targets: Sequence[TargetData]) -> TransferModel:
    """The worker's model, seeded as the worker seeds it (so both sides start identical)."""
    heads = {t.name: t.num_classes for t in targets}
    torch.manual_seed(cfg.seed)
    model = build_transfer_model(
        backbone=cfg.model.backbone,
        in_channels=cfg.data.channels,
        small_input=cfg.small_input,
        weights=cfg.model.weights,
        fusion_depth=cfg.model.fusion_depth,
        fusion_width=cfg.model.fusion_width,
        heads=heads,
        head_dropout=cfg.model.head_dropout,
        fusion_dropout=cfg.model.fusion_dropout,
    )
    torch.manual_seed(cfg.seed + 1)
    model.reset_heads(heads)
    # The worker's layout (resources.channels_last), so both sides run the same kernels.
    return model.to(memory_format=memory_format(cfg.resources.channels_last))


def build_sgd(model: TransferModel, cfg: TrialConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum and the stage-2 learning rate per parameter group."""
    stage = cfg.stage2
    groups = [
        {"params": params, "lr": stage.lr * stage.lr_mult(name)}
        for name, params in model.param_groups().items()
        if params
    ]
    return torch.optim.SGD(
        groups,
        lr=stage.lr,
        momentum=stage.momentum,
        nesterov=stage.nesterov,
        weight_decay=stage.weight_decay,
    )


def plain_train_epoch(
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    targets: Sequence[TargetData],
    cfg: TrialConfig,
    epoch: int,
) -> EpochStats:
    """One pass over every target, one mixed batch per step; timed like dtlray's train pass."""
    model.train()
    start = time.perf_counter()
    total = sum(len(t.labels) for t in targets)
    steps = max(1, total // cfg.stage2.batch_size)  # floor: every step has >= batch_size rows
    # The worker's shuffle (rank 0), so both sides see the same batches in the same order.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101)
    chunks = []
    for t in targets:
        order = torch.randperm(len(t.labels), generator=generator)
        if len(order) < steps:  # a tiny target: cycle it so every step has one of its rows
            order = order.repeat(math.ceil(steps / max(len(order), 1)))
        chunks.append(torch.tensor_split(order, steps))
    seen, loss_sum = 0, 0.0
    for step in range(steps):
        parts = [(t, chunk[step]) for t, chunk in zip(targets, chunks, strict=True)]
        x = torch.cat(
            [
                to_model_input(t.images[idx], cfg.data.image_size, cfg.data.channels)
                for t, idx in parts
            ]
        ).contiguous(memory_format=memory_format(cfg.resources.channels_last))
        logits = model(x)
        losses, offset = [], 0
        for t, idx in parts:
            n = len(idx)
            losses.append(F.cross_entropy(logits[t.name][offset : offset + n], t.labels[idx]))
            offset += n
        loss = torch.stack(losses).mean()  # every target weighs the same
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * offset
        seen += offset
    return EpochStats(seen, time.perf_counter() - start, loss_sum / max(seen, 1))


def run_plain(cfg: TrialConfig, threads: int) -> tuple[list[EpochStats], float]:
    """All epochs of the plain loop; returns per-epoch stats and the set-up seconds."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    targets = load_targets(cfg)
    model = build_model(cfg, targets)
    optimizer = build_sgd(model, cfg)
    setup = time.perf_counter() - start
    stats = [plain_train_epoch(model, optimizer, targets, cfg, e) for e in range(cfg.stage2.epochs)]
    return stats, setup


def cold_import_seconds(repeats: int = 3) -> float:
    """Median seconds a fresh interpreter takes to ``import torch, torchvision``: what a plain
    PyTorch script pays before its set-up, and a search trial's new process pays as well.
    ``run_plain`` runs in this already-importing process, so its set-up does not include it."""
    code = "import time; t = time.perf_counter(); import torch, torchvision; "
    code += "print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return statistics.median(runs)


# -- the dtlray side ----------------------------------------------------------------------------


class ReportLog(ray.train.UserCallback):
    """Appends every report to a JSON-lines file.

    Runs in the Train controller actor, not in this process, so a file is the way back. Each line
    holds rank 0's metrics and the newest modification time in the persisted checkpoint, which
    the worker wrote inside ``ray.train.report``: the controller sees a report only at its next
    poll of the workers (every 2 s), so its own clock would be up to 2 s late.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        written, size = None, 0
        if checkpoint is not None:
            files = [p for p in Path(checkpoint.path).rglob("*") if p.is_file()]
            written = max(p.stat().st_mtime for p in files)
            size = sum(p.stat().st_size for p in files)
        record = {"metrics": metrics[0], "written": written, "checkpoint_bytes": size}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class DtlrayRun:
    """What the dtlray side measured."""

    epochs: list[EpochStats]
    report_times: list[float]  # time.time() of each persisted checkpoint
    checkpoint_bytes: int
    build_seconds: float
    fit_start: float  # time.time()
    fit_end: float  # time.time()


def run_dtlray(cfg: TrialConfig, storage: str) -> DtlrayRun:
    """Build and run the trial on the running Ray; collect every epoch's report."""
    reports_file = os.path.join(storage, "reports.jsonl")
    # Report times are read off each report's checkpoint: this side checkpoints every epoch.
    cfg = TrialConfig.from_flat({"resources.checkpoint": "every_epoch"}, base=cfg)
    start = time.perf_counter()
    trainer, _ = build_trainer(
        cfg,
        storage_path=storage,
        run_name=RUN_NAME,
        callbacks=[ReportLog(reports_file)],
        run_test=False,  # as in a search trial: test splits are for the winner only
    )
    build_seconds = time.perf_counter() - start
    # Wall-clock stamps here: they are compared with file times written by another process.
    fit_start = time.time()
    run_trainer(trainer)
    fit_end = time.time()

    with open(reports_file) as f:
        records = [json.loads(line) for line in f]
    if len(records) != cfg.stage2.epochs or any(r["written"] is None for r in records):
        raise RuntimeError(f"expected {cfg.stage2.epochs} reports with checkpoints: {records}")
    epochs = [
        EpochStats(
            samples=round(
                r["metrics"]["train/samples_per_s"] * r["metrics"]["train/epoch_seconds"]
            ),
            seconds=r["metrics"]["train/epoch_seconds"],
            loss=r["metrics"]["train/loss"],
        )
        for r in records
    ]
    return DtlrayRun(
        epochs=epochs,
        report_times=[r["written"] for r in records],
        checkpoint_bytes=records[-1]["checkpoint_bytes"],
        build_seconds=build_seconds,
        fit_start=fit_start,
        fit_end=fit_end,
    )


@dataclass
class SearchTrial:
    """One trial of a search, from its reports."""

    epochs: list[EpochStats]
    between_reports: list[float]  # seconds from one report to the next (Tune's time_this_iter_s)
    total: float  # Tune's time_total_s of the last report: trial start to last report
    validation: list[float]  # each epoch's validation pass (its val/epoch_seconds)

    def setup(self) -> float:
        """Its start to its first report, less epoch 1's train pass and a typical epoch's part
        outside the train pass: the trial function's own set-up."""
        return self.between_reports[0] - self.epochs[0].seconds - statistics.median(self.outside())

    def outside(self) -> list[float]:
        """Epochs 2..N: report to report, less the train pass."""
        return [
            b - e.seconds for b, e in zip(self.between_reports[1:], self.epochs[1:], strict=True)
        ]


@dataclass
class SearchTrialRun:
    """A ``dtlray tune`` search of copies of the same trial, one at a time."""

    trials: list[SearchTrial]  # in the order they ran
    wall: float  # tuner.fit() call to its result


def run_search_trial(cfg: TrialConfig, storage: str, trials: int = 1) -> SearchTrialRun:
    """The same trial as a search (FIFO) of ``trials`` copies, one at a time: Tune runs it,
    in-process for one worker; from the second on, in the first one's process (reused)."""
    space = parse_space(
        {
            "trial": cfg.to_dict(),
            # One value: the search is the trial itself (a space must search something).
            "search": {"stage2.lr": {"choices": [cfg.stage2.lr]}},
            "scheduler": {"type": "fifo"},
            "num_samples": trials,
            "max_concurrent_trials": 1,
        }
    )
    name = f"search-{trials}-trials"
    tuner = build_tuner(space, storage_path=storage, name=name, study_storage=None)
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"a search trial failed: {errors[0]}")
    if len({r.metrics["pid"] for r in results}) != 1:
        raise RuntimeError("the search's trials did not run in one reused process")
    out = []
    for result in sorted(results, key=lambda r: r.metrics["timestamp"]):
        rows = result.metrics_dataframe.to_dict("records")
        if len(rows) != cfg.stage2.epochs:
            raise RuntimeError(f"expected {cfg.stage2.epochs} reports, got {len(rows)}")
        epochs = [
            EpochStats(
                samples=round(r["train/samples_per_s"] * r["train/epoch_seconds"]),
                seconds=r["train/epoch_seconds"],
                loss=r["train/loss"],
            )
            for r in rows
        ]
        between = [r["time_this_iter_s"] for r in rows]
        validation = [r["val/epoch_seconds"] for r in rows]
        out.append(SearchTrial(epochs, between, rows[-1]["time_total_s"], validation))
    return SearchTrialRun(out, wall)


# -- output -------------------------------------------------------------------------------------


def median_rate(runs: Sequence[Sequence[EpochStats]]) -> float:
    """Median samples/s over the measured (non-warm-up) epochs of ``runs``, pooled."""
    return statistics.median(e.samples_per_s for run in runs for e in run[1:])


def print_report(
    cfg: TrialConfig,
    before: list[EpochStats],
    after: list[EpochStats],
    plain_setup: float,
    dtlray: DtlrayRun,
) -> None:
    """The side-by-side table, the ratio and the fixed cost."""
    print("\nsamples/s of the train pass of each epoch (validation and checkpoints excluded)")
    print(f"{'epoch':<14}{'plain before':>14}{'dtlray':>14}{'plain after':>14}")
    for i in range(cfg.stage2.epochs):
        label = f"{i + 1}" + (" (warm-up)" if i == 0 else "")
        row = (before[i], dtlray.epochs[i], after[i])
        print(f"{label:<14}" + "".join(f"{e.samples_per_s:>14.1f}" for e in row))
    d_med = median_rate([dtlray.epochs])
    p_before, p_after = median_rate([before]), median_rate([after])
    p_med = median_rate([before, after])
    print(f"{'median 2..':<14}{p_before:>14.1f}{d_med:>14.1f}{p_after:>14.1f}")
    print(
        f"last-epoch train loss: plain {before[-1].loss:.4f} / {after[-1].loss:.4f}, "
        f"dtlray {dtlray.epochs[-1].loss:.4f} (same start, same batches: should agree)"
    )
    print(f"plain reference (median of both runs' measured epochs): {p_med:.1f} samples/s")
    print(f"RATIO dtlray / plain = {d_med / p_med:.3f}  (goal >= 0.95)")

    # Per epoch outside the train pass: worker time between two reports minus the train pass.
    times = dtlray.report_times
    non_train = [times[i] - times[i - 1] - dtlray.epochs[i].seconds for i in range(1, len(times))]
    typical = statistics.median(non_train)
    startup = times[0] - dtlray.fit_start - dtlray.epochs[0].seconds - typical
    tail = dtlray.fit_end - times[-1]
    wall = dtlray.fit_end - dtlray.fit_start
    print("\ndtlray fixed cost per trial (paid once, whatever the number of epochs)")
    print(
        f"  build_trainer (driver: read targets, make Ray datasets)  {dtlray.build_seconds:6.2f} s"
    )
    print(f"  start-up before epoch 1 (workers, data hand-off, model)  {startup:6.2f} s")
    print(f"  after the last report (controller poll, shutdown)        {tail:6.2f} s")
    fixed = dtlray.build_seconds + startup + tail
    print(f"  FIXED TOTAL                                              {fixed:6.2f} s")
    print(
        f"  (run_trainer wall {wall:.2f} s = start-up + {len(times)} epochs "
        f"{times[-1] - times[0] + dtlray.epochs[0].seconds + typical:.2f} s + tail; "
        f"plain set-up for comparison: {plain_setup:.2f} s)"
    )
    checkpoint_mb = dtlray.checkpoint_bytes / 2**20
    print(
        f"dtlray per epoch outside the train pass (validation, {checkpoint_mb:.0f} MB checkpoint,"
        f" report): median {typical:.2f} s [{', '.join(f'{s:.2f}' for s in non_train)}]"
    )


def print_search_trial(
    cfg: TrialConfig,
    plain: Sequence[tuple[list[EpochStats], float]],
    single: SearchTrialRun,
    repeated: SearchTrialRun,
    cold_imports: float,
) -> None:
    """What a one-worker search trial costs from the user's side, and the headline lines."""
    (trial,) = single.trials
    outside = trial.outside()
    train = [e.seconds for e in trial.epochs[1:]]
    share = statistics.median(o / t for o, t in zip(outside, train, strict=True))
    # Of that, the validation pass (the metric a scheduler decides on, every epoch) and the rest.
    val_share = statistics.median(v / t for v, t in zip(trial.validation[1:], train, strict=True))
    # Fixed: the wall less epochs 2..N (report to report) and epoch 1 (its train pass plus a
    # typical epoch's part outside it) = the trial function's set-up + Tune around the trial
    # (before it starts: the trial process with its imports; after its last report).
    around = single.wall - trial.total
    fixed = trial.setup() + around
    # The plain loop's wall: the mean of its two runs, before and after (the search trial runs
    # between them, so a drift in the machine's speed cancels out to first order).
    plain_walls = [setup + sum(e.seconds for e in epochs) for epochs, setup in plain]
    plain_wall = statistics.mean(plain_walls)
    print("\none-worker search trial (dtlray tune, 1 trial, FIFO): call to result")
    print(
        f"  tuner.fit() wall {single.wall:.2f} s for {len(trial.epochs)} epochs; plain loop "
        f"wall (set-up + the same epochs) {plain_wall:.2f} s (before Ray "
        f"{plain_walls[0]:.2f} s, after {plain_walls[1]:.2f} s)"
    )
    print(
        f"  of which train passes: dtlray {sum(e.seconds for e in trial.epochs):.2f} s, plain "
        f"{' s and '.join(f'{sum(e.seconds for e in epochs):.2f}' for epochs, _ in plain)} s"
    )
    print(
        f"  fixed cost (wall minus the epochs) {fixed:.2f} s = the trial function's set-up (data, "
        f"model, stage-1 plan) {trial.setup():.2f} s + Tune around it (trial actor start with its "
        f"imports, shut-down) {around:.2f} s"
    )
    print(
        f"  per epoch outside the train pass median {statistics.median(outside):.2f} s "
        f"[{', '.join(f'{o:.2f}' for o in outside)}]"
    )
    # Later trials of a search, in the first one's process: Tune around them is what the
    # repeated search's wall holds beyond its trials' own time and the first trial's `around`
    # (a fresh process, as in the single search).
    later = repeated.trials[1:]
    around_later = (repeated.wall - sum(t.total for t in repeated.trials) - around) / len(later)
    later_fixed = around_later + statistics.mean(t.setup() for t in later)
    later_wall = single.wall - fixed + later_fixed
    print(
        f"  a later trial of a search (a search of {len(repeated.trials)} copies one at a time, "
        f"wall {repeated.wall:.2f} s; the later ones in the first one's process): fixed cost "
        f"{later_fixed:.2f} s (Tune around it {around_later:.2f} s); plain/dtlray "
        f"{plain_wall / later_wall:.3f}"
    )
    print(
        f"  a fresh interpreter's import torch, torchvision: {cold_imports:.2f} s (paid by the "
        f"trial's new process inside the fixed cost above, and by a plain script before its "
        f"set-up, which the plain wall leaves out); counting it on both sides: plain/dtlray "
        f"{(plain_wall + cold_imports) / single.wall:.3f}, fixed cost beyond it "
        f"{fixed - cold_imports:.2f} s"
    )
    print(f"END-TO-END RATIO plain/dtlray = {plain_wall / single.wall:.3f}  (goal >= 0.85)")
    print(
        f"PER-EPOCH OVERHEAD = {share * 100:.1f}%  (goal <= 5%; the validation pass alone "
        f"{val_share * 100:.1f}%, medians over epochs 2..N)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Plain loop, dtlray trial, plain loop again; then the report."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dtlray-bench-") as tmp:
        data_root = args.data_root or os.path.join(tmp, "data")
        cfg = build_config(args, data_root)
        if args.data_root is None:
            for name in cfg.data.targets:
                prepare_builtin(name, data_root)

        rows = sum(len(t.labels) for t in load_targets(cfg))
        print(
            f"torch {torch.__version__} | ray {ray.__version__} | python "
            f"{platform.python_version()} | {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0))} usable) | threads {args.threads} | "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"{cfg.model.backbone} (small_input={cfg.small_input}) at {cfg.data.image_size}px "
            f"x{cfg.data.channels}, batch {cfg.stage2.batch_size}, targets "
            f"{'+'.join(cfg.data.targets)}: {rows} train rows "
            f"(<= {cfg.stage2.samples_per_class}/class), {cfg.stage2.epochs} epochs per side, "
            f"{'channels_last' if cfg.resources.channels_last else 'NCHW'} on both sides"
        )

        print("plain loop, before Ray ...", flush=True)
        before, plain_setup = run_plain(cfg, args.threads)
        cold_imports = cold_import_seconds()

        print("dtlray trial on a private local Ray ...", flush=True)
        # The Ray dtlray starts for itself (a private one, its dashboard on a free port); the
        # trials' lines are not printed.
        init_ray(None, num_cpus=max(2, args.threads), log_to_driver=False)
        try:
            dtlray = run_dtlray(cfg, os.path.join(tmp, "storage"))
            print("the same trial as a one-trial dtlray search ...", flush=True)
            search_trial = run_search_trial(cfg, os.path.join(tmp, "search"))
            print(
                f"the same trial {REUSED_TRIALS + 1} times in one search, one at a time ...",
                flush=True,
            )
            repeated = run_search_trial(cfg, os.path.join(tmp, "search"), REUSED_TRIALS + 1)
        finally:
            ray.shutdown()

        print("plain loop, after Ray ...", flush=True)
        after, after_setup = run_plain(cfg, args.threads)

        print_report(cfg, before, after, plain_setup, dtlray)
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on this machine)")
        plain = [(before, plain_setup), (after, after_setup)]
        print_search_trial(cfg, plain, search_trial, repeated, cold_imports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
