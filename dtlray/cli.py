"""The ``dtlray`` command line: argparse subcommands, ``main() -> int``.

Every subcommand module exposes ``add_parser(subparsers)`` which registers its arguments and sets
``handler`` (a function ``args -> int``). A :class:`~dtlray.errors.DtlrayError` is printed as one
line and exits 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dtlray.errors import DtlrayError


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
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
    _add_train_parser(subparsers)
    return parser


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="run one trial (both stages) with a space's fixed values, no search",
        description="Run one trial: pretrain on the source, finetune on the targets. Searched "
        "parameters take their default unless set with --set.",
    )
    p.add_argument("space", metavar="SPACE.yaml", help="a search-space file (search_spaces/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.backbone=vgg11_bn (repeatable)",
    )
    p.add_argument("--storage-path", help="results directory or URI (default ~/dtlray_results)")
    p.add_argument("--name", help="run name (default: train-<space>-<time>)")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
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
    import time

    from dtlray.config import TrialConfig
    from dtlray.search_space import load_space
    from dtlray.trial import build_trainer, init_ray, resolve_storage_path, run_trainer

    space = load_space(args.space)
    cfg = TrialConfig.from_flat(parse_overrides(args.overrides), base=space.trial_config())
    storage_path = resolve_storage_path(args.storage_path)
    name = args.name or f"train-{space.name or 'space'}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(args.address)
    trainer, plan = build_trainer(cfg, storage_path=storage_path, run_name=name)
    print(
        f"dtlray train: {cfg.model.backbone}, fusion depth {cfg.model.fusion_depth}, "
        f"{cfg.data.source} -> {', '.join(cfg.data.targets)}; stage 1: {plan.stage1_mode}; "
        f"{cfg.resources.num_workers} worker(s)",
        flush=True,
    )
    result = run_trainer(trainer)
    print("\nfinal metrics:")
    for key in sorted(result.metrics):
        value = result.metrics[key]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<36} {shown}")
    print(f"\nresults: {result.path}")
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
