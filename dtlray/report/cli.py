"""``dtlray report EXPERIMENT [--baseline] [--baseline-seeds N] [--address ADDR] [--top-k K]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtlray.experiment import REPORT_DIR
from dtlray.report.remote import fetch_records, publish
from dtlray.report.sections import DEFAULT_TOP_K, build_report
from dtlray.storage import is_uri, join


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dtlray report`` on the top-level subparsers.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``report`` parser (its ``handler`` is set).
    """
    p = subparsers.add_parser(
        "report",
        help="results table, best config, plots and transfer gain of a search",
        description="Write <EXPERIMENT>/report/ (report.md, report.html and PNG plots): all "
        "trials, the best configuration with its val and test accuracy per target, "
        "optimization history, parameter importances, learning curves, stage-1 reuse, and the "
        "transfer gain over training the best configuration from scratch, with a 95% confidence "
        "interval (paired bootstrap over the test images and the scratch seeds).",
    )
    p.add_argument(
        "experiment",
        metavar="EXPERIMENT",
        help="the experiment directory (<storage-path>/<name>), or its URI (s3://...): then "
        "its records are mirrored under ~/.cache/dtlray/experiments and the report is "
        "uploaded beside it",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="train the from-scratch baseline when it is missing (needs Ray)",
    )
    p.add_argument(
        "--baseline-seeds",
        type=int,
        default=1,
        metavar="N",
        help="scratch baseline runs, one per seed, for the gain's confidence interval "
        "(default 1; implies --baseline when more are needed than stored)",
    )
    p.add_argument("--address", help="Ray cluster address for --baseline (default: local Ray)")
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"trials drawn in the learning-curve plot (default {DEFAULT_TOP_K})",
    )
    p.set_defaults(handler=_cmd_report)
    return p


def _cmd_report(args: argparse.Namespace) -> int:
    remote = is_uri(args.experiment)
    experiment = fetch_records(args.experiment) if remote else args.experiment
    out = build_report(
        experiment,
        baseline=args.baseline or args.baseline_seeds > 1,
        baseline_seeds=args.baseline_seeds,
        address=args.address,
        top_k=args.top_k,
    )
    if remote:
        publish(Path(experiment), args.experiment)
        print(f"report: {join(args.experiment, REPORT_DIR, 'report.html')}")
        print(f"        (local copy: {out / 'report.html'})")
        return 0
    print(f"report: {out / 'report.html'}\n        {out / 'report.md'}")
    return 0


def main_args(argv: Sequence[str]) -> int:
    """Run ``dtlray report`` with ``argv`` (the arguments after ``report``).

    A :class:`DtlrayError` propagates (``dtlray.cli.main`` prints it and exits 2).
    """
    parser = argparse.ArgumentParser(prog="dtlray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *argv])
    return int(args.handler(args) or 0)
