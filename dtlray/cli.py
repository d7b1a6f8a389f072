"""The ``dtlray`` command line: argparse subcommands, ``main() -> int``.

Every subcommand module exposes ``add_parser(subparsers)`` which registers its arguments and sets
``handler`` (a function ``args -> int``). A :class:`~dtlray.errors.DtlrayError` is printed as one
line and exits 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dtlray.errors import DtlrayError


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    from dtlray import dashboard, report
    from dtlray.data import cli as data_cli

    parser = argparse.ArgumentParser(
        prog="dtlray",
        description="Search two-stage transfer-learning pipelines with Ray Train, Tune and Optuna.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and debug logs on errors"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_cli.add_parser(subparsers)
    dashboard.add_parser(subparsers)
    report.add_parser(subparsers)
    _add_check_parser(subparsers)
    _add_train_parser(subparsers)
    _add_tune_parser(subparsers)
    return parser


def _add_check_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a search-space file without starting Ray",
        description="Validate a search space: keys, bounds, backbones, types. Starts no Ray.",
    )
    p.add_argument("spaces", metavar="SPACE.yaml", nargs="+", help="search-space file(s)")
    p.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from dtlray.search_space import check_searchable, load_space

    for path in args.spaces:
        space = load_space(path)
        check_searchable(space, path)
        trial = space.trial
        logme = space.scheduler.logme_quantile
        rung = "" if logme is None else f", behind a LogME rung at the {logme:g} quantile"
        print(
            f"{path}: ok — {space.num_samples} trials, {len(space.search)} searched "
            f"({', '.join(space.search)}), {space.searcher.type} searcher, "
            f"{space.scheduler.type} scheduler (max {space.max_epochs} finetune epochs, first "
            f"rung {space.grace_period}{rung}), objective {space.objective.metric} "
            f"({space.objective.mode}); {trial.data.source} -> {', '.join(trial.data.targets)}"
        )
    return 0


def _add_overrides(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Tune's and Train's full console output (default: dtlray's lines only)",
    )


def _add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search a space with Ray Tune + Optuna (+ ASHA)",
        description="Run a search: Optuna picks configurations, ASHA stops poor ones, trials "
        "that share stage-1 settings pretrain once. Ends with the best config, its val and "
        "test accuracy, saved as best.json in the experiment directory.",
    )
    p.add_argument("space", metavar="SPACE.yaml", help="a search-space file (search_spaces/)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--storage-path", help="results directory or URI (default ~/dtlray_results)")
    p.add_argument("--name", help="experiment name (default: <space>-<time>); needed to --resume")
    p.add_argument("--num-samples", type=int, metavar="N", help="number of trials")
    p.add_argument(
        "--max-concurrent-trials", type=int, metavar="N", help="default: what the cluster fits"
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted --name")
    p.add_argument(
        "--study-storage",
        metavar="URL",
        help="keep the Optuna study there (e.g. sqlite:///study.db) for optuna-dashboard",
    )
    _add_overrides(p, "override a fixed trial value, e.g. --set stage2.epochs=2 (repeatable)")
    _add_verbose(p)
    p.set_defaults(handler=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from dtlray.experiment import ExperimentDir, default_name, resolve_storage_path
    from dtlray.ray_session import init_ray
    from dtlray.search import (
        build_tuner,
        check_datasets,
        resolve_space,
        restore_tuner,
        started_space,
        summarize_best,
        unfinished_trials,
    )
    from dtlray.search_space import check_searchable, load_space

    if args.num_samples is not None and args.num_samples < 1:
        raise DtlrayError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.resume and not args.name:
        raise DtlrayError("--resume needs the --name of the interrupted experiment")
    space = load_space(args.space)
    overrides = parse_overrides(args.overrides)
    budget = {"num_samples": args.num_samples, "max_concurrent_trials": args.max_concurrent_trials}
    storage_path = resolve_storage_path(args.storage_path)
    experiment = ExperimentDir.at(storage_path, args.name or default_name(space.name))
    # Bad input fails here, in one line, before Ray starts.
    if args.resume:
        started_space(experiment, overrides=overrides, **budget)
    else:
        check_searchable(space, args.space)
        check_datasets(resolve_space(space, overrides=overrides))
    if not args.verbose:
        # Tune's console (status tables, its experiment banner) gives way to dtlray's lines;
        # with the new output engine even verbose=0 prints a banner.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    dashboard = init_ray(args.address, verbose=args.verbose)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", flush=True)
    if args.resume:
        tuner = restore_tuner(storage_path, experiment.name, overrides=overrides, **budget)
    else:
        tuner = build_tuner(
            space,
            storage_path=storage_path,
            name=experiment.name,
            study_storage=args.study_storage or "auto",
            overrides=overrides,
            verbose=args.verbose,
            **budget,
        )
    # From here on the search is what it was started as: read it back from the experiment.
    started = experiment.read_space()
    if args.study_storage is None and experiment.is_local:
        print(f"Optuna study: dtlray dashboard {experiment.path}", flush=True)
    with experiment.running():
        results = tuner.fit()
    left = unfinished_trials(results, started.num_samples)
    if left:
        print(
            f"\ndtlray tune: interrupted with {left} trial(s) unfinished. Resume with the same "
            f"command plus --resume:\n  dtlray tune {args.space} --storage-path {storage_path} "
            f"--name {experiment.name}{_set_args(args.overrides)} --resume",
            flush=True,
        )
        return 130
    summary = summarize_best(results, started, experiment)
    _print_summary(summary, experiment.path)
    return 0


def _set_args(pairs: Sequence[str]) -> str:
    return "".join(f" --set {pair}" for pair in pairs)


def _print_summary(summary: dict, experiment_path: str) -> None:
    objective = summary["objective"]
    print(f"\nbest trial {summary['trial_id']}: {objective['metric']} = {objective['value']:.4f}")
    for key, value in summary["searched"].items():
        print(f"  {key:<28} {value}")
    for key, value in sorted(summary["val"].items()):
        print(f"  {key:<28} {value:.4f}")
    for key, value in sorted(summary.get("test", {}).items()):
        print(f"  {key:<28} {value:.4f}")
    reuse = summary["stage1"]
    diverged = f", {summary['diverged']} diverged" if summary.get("diverged") else ""
    scratch = f", {reuse['scratch']} from scratch" if reuse.get("scratch") else ""
    tree = ""
    if reuse.get("continued"):
        tree = (
            f" ({reuse['continued']} continued a stored constant phase, "
            f"{reuse['epochs_continued']:.3g} epoch(s) not retrained)"
        )
    print(
        f"stage 1: {reuse['misses']} computed{tree}, {reuse['hits']} reused{scratch} "
        f"({reuse['seconds_saved']:.0f} s of pretraining saved); "
        f"{summary['trials']} trials, {summary['errors']} failed{diverged}"
    )
    print(f"best.json and results: {experiment_path}")


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="run one trial (both stages) with a space's fixed values, no search",
        description="Run one trial: pretrain on the source, finetune on the targets. Searched "
        "parameters take their default unless set with --set.",
    )
    p.add_argument("space", metavar="SPACE.yaml", help="a search-space file (search_spaces/)")
    _add_overrides(p, "override a config value, e.g. --set model.backbone=vgg11_bn (repeatable)")
    p.add_argument("--storage-path", help="results directory or URI (default ~/dtlray_results)")
    p.add_argument("--name", help="run name (default: train-<space>-<time>)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    _add_verbose(p)
    p.set_defaults(handler=_cmd_train)


def parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``["a.b=1", "c.d=[x, y]"]`` -> ``{"a.b": 1, "c.d": ["x", "y"]}`` (values read as YAML)."""
    import yaml

    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DtlrayError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set stage2.lr=0.01")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DtlrayError(f"--set {pair!r}: the value is not valid YAML") from None
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from dtlray.config import TrialConfig
    from dtlray.experiment import default_name, resolve_storage_path
    from dtlray.metrics import DIVERGED_METRIC, DIVERGED_REASON
    from dtlray.ray_session import init_ray
    from dtlray.search_space import load_space
    from dtlray.storage import join
    from dtlray.trial import build_trainer, run_trainer

    space = load_space(args.space)
    cfg = TrialConfig.from_flat(parse_overrides(args.overrides), base=space.trial_config())
    storage_path = resolve_storage_path(args.storage_path)
    name = args.name or default_name(space.name, prefix="train")
    init_ray(args.address, verbose=args.verbose)
    trainer, plan = build_trainer(cfg, storage_path=storage_path, run_name=name)
    print(
        f"dtlray train: {cfg.model.backbone}, fusion depth {cfg.model.fusion_depth}, "
        f"{cfg.data.source} -> {', '.join(cfg.data.targets)}; stage 1: {plan.stage1_mode}; "
        f"{cfg.resources.num_workers} worker(s)",
        flush=True,
    )
    result = run_trainer(trainer)
    where = join(storage_path, name)  # result.path drops a URI's scheme
    metrics = result.metrics or {}
    if metrics.get(DIVERGED_METRIC):
        print(f"\ndtlray train: {metrics[DIVERGED_REASON]}", file=sys.stderr)
        print(f"results: {where}")
        return 1
    print("\nfinal metrics:")
    for key in sorted(metrics):
        value = metrics[key]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<36} {shown}")
    print(f"\nresults: {where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except DtlrayError as err:
        if args.debug:
            raise
        print(f"dtlray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtlray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `ray submit cluster.yaml dtlray/cli.py -- tune ...` runs this file
    sys.exit(main())
