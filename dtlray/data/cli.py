"""``dtlray data prepare`` and ``dtlray data list``.

Neither imports torch or Ray (tests/unit/test_light_imports.py checks it): preparing needs numpy,
pyarrow and the dataset's own reader, listing reads only ``dataset.json`` files.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from dtlray.data.builtins import build_builtin
from dtlray.data.codec import IMAGE_FORMATS
from dtlray.data.folder import ENCODE_FROM_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, build_image_folder
from dtlray.data.layout import (
    BUILTIN_DATASETS,
    SPLITS,
    DatasetInfo,
    list_dataset_names,
    read_info,
    resolve_root,
)
from dtlray.data.prepare import Prepared
from dtlray.data.read import describe_dataset
from dtlray.errors import DtlrayError
from dtlray.storage import join

DEFAULT_IMAGE_SIZE = 32
DEFAULT_CHANNELS = 3
_CLASSES_WIDTH = 48


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``data prepare`` and ``data list`` on the top-level subparsers.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``data`` parser.
    """
    data = subparsers.add_parser(
        "data",
        help="prepare datasets as Parquet shards, list them",
        description="Prepare datasets once (raw images -> Parquet shards); training streams them.",
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="prepare a built-in dataset or a folder of class sub-folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            f"""\
            Prepare a dataset under the data root (--root, else $DTLRAY_DATA, else
            ~/.cache/dtlray/data):

              dtlray data prepare NAME                    # built-in: {", ".join(BUILTIN_DATASETS)}
              dtlray data prepare --image-folder DIR --name NAME

            Running it again with the same arguments reuses the dataset; --force rebuilds it."""
        ),
    )
    prepare.add_argument(
        "dataset",
        nargs="?",
        metavar="NAME",
        help=f"built-in dataset: {', '.join(BUILTIN_DATASETS)}",
    )
    prepare.add_argument(
        "--root",
        metavar="DIR|URI",
        help="data root: a directory or a URI such as s3://BUCKET/data "
        "(default: $DTLRAY_DATA or ~/.cache/dtlray/data)",
    )
    prepare.add_argument(
        "--seed", type=int, default=0, help="seed of the stratified splits (default 0)"
    )
    prepare.add_argument("--force", action="store_true", help="rebuild even if it exists")
    prepare.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        help="how images are stored: raw pixels, or PNG/JPEG files that Ray Data decodes ahead "
        f"of the trainer (default: raw for the built-ins and for folders under {ENCODE_FROM_SIZE} "
        "px, jpeg from there)",
    )
    builtin = prepare.add_argument_group("built-in datasets")
    builtin.add_argument(
        "--limit", type=int, metavar="N", help="keep at most N rows per split (tests)"
    )
    builtin.add_argument(
        "--from",
        dest="source_dir",
        metavar="DIR",
        help="fashion-mnist: folder with the IDX files (default /usr/share/datasets/fashion-mnist)",
    )
    builtin.add_argument(
        "--download",
        action="store_true",
        help="fashion-mnist: download the IDX files with torchvision if missing (needs internet)",
    )
    folder = prepare.add_argument_group("image folder")
    folder.add_argument(
        "--image-folder", metavar="DIR", help="folder with one sub-folder per class"
    )
    folder.add_argument("--name", metavar="NAME", help="name of the dataset to make from it")
    folder.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help=f"stored height and width, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} "
        f"(default {DEFAULT_IMAGE_SIZE})",
    )
    folder.add_argument(
        "--channels",
        type=int,
        metavar="C",
        help=f"stored channels: 1 (grey) or 3 (RGB) (default {DEFAULT_CHANNELS})",
    )
    folder.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images instead of failing"
    )
    prepare.set_defaults(handler=run_prepare)

    listing = actions.add_parser("list", help="list prepared datasets")
    listing.add_argument(
        "--root",
        metavar="DIR|URI",
        help="data root: a directory or a URI such as s3://BUCKET/data "
        "(default: $DTLRAY_DATA or ~/.cache/dtlray/data)",
    )
    listing.set_defaults(handler=run_list)
    return data


def run_prepare(args: argparse.Namespace) -> int:
    """Handle ``dtlray data prepare``; print what was prepared or reused."""
    if args.image_folder is not None:
        prepared = _prepare_folder(args)
    else:
        prepared = _prepare_builtin(args)
    info = prepared.info
    # on reuse, the log line above already said that the arguments match and what --force does
    print(f"{'reusing' if prepared.reused else 'prepared'} {describe_dataset(info)}")
    print(f"  from {info.provenance.source}")
    return 0


def _prepare_builtin(args: argparse.Namespace) -> Prepared:
    if args.dataset is None:
        raise DtlrayError(
            f"name a built-in dataset ({', '.join(BUILTIN_DATASETS)}), or pass "
            "--image-folder DIR --name NAME for your own images"
        )
    used = _given(args, "name", "image_size", "channels", "skip_bad")
    if used:
        raise DtlrayError(
            f"{', '.join(used)} apply only with --image-folder: drop them for the built-in "
            f"dataset {args.dataset!r}"
        )
    return build_builtin(
        args.dataset,
        args.root,
        force=args.force,
        seed=args.seed,
        limit=args.limit,
        source_dir=args.source_dir,
        download=args.download,
        image_format=args.image_format or "raw",
    )


def _prepare_folder(args: argparse.Namespace) -> Prepared:
    if args.name is None:
        raise DtlrayError("--image-folder needs a dataset name: add --name NAME")
    if args.dataset is not None:
        raise DtlrayError(
            f"got both a built-in NAME ({args.dataset!r}) and --image-folder: give the folder's "
            "dataset name with --name NAME only"
        )
    used = _given(args, "limit", "source_dir", "download")
    if used:
        raise DtlrayError(
            f"{', '.join(used)} apply only to built-in datasets: drop them for --image-folder"
        )
    return build_image_folder(
        args.image_folder,
        args.name,
        args.root,
        image_size=DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size,
        channels=DEFAULT_CHANNELS if args.channels is None else args.channels,
        force=args.force,
        seed=args.seed,
        skip_bad=args.skip_bad,
        image_format=args.image_format,
    )


def _given(args: argparse.Namespace, *dests: str) -> list[str]:
    """The command-line spelling of the options among ``dests`` that the user gave."""
    flags = {"source_dir": "--from"}
    return [
        flags.get(dest, "--" + dest.replace("_", "-"))
        for dest in dests
        if getattr(args, dest) not in (None, False)
    ]


def run_list(args: argparse.Namespace) -> int:
    """Handle ``dtlray data list``: one aligned table row per prepared dataset."""
    root = resolve_root(args.root)
    names = list_dataset_names(root)
    if not names:
        print(
            f"no datasets in {root}: prepare one with `dtlray data prepare NAME` "
            f"({', '.join(BUILTIN_DATASETS)}) or "
            "`dtlray data prepare --image-folder DIR --name NAME`"
        )
        return 0
    header = ["NAME", "CLASSES", "SHAPE", "FORMAT", *(split.upper() for split in SPLITS)]
    rows = []
    for name in names:
        try:
            rows.append(_list_row(read_info(join(root, name))))
        except DtlrayError as err:
            rows.append([name, f"invalid: {err}", "", "", "", "", ""])
    print(f"datasets in {root}:")
    print(format_table(header, rows, right_aligned={4, 5, 6}))
    return 0


def _list_row(info: DatasetInfo) -> list[str]:
    classes = f"{info.num_classes}: {', '.join(info.classes)}"
    if len(classes) > _CLASSES_WIDTH:
        classes = classes[: _CLASSES_WIDTH - 3].rstrip(", ") + "..."
    height, width, channels = info.image_shape
    return [
        info.name,
        classes,
        f"{height}x{width}x{channels}",
        info.image_format,
        *(f"{info.splits[split]:,}" for split in SPLITS),
    ]


def format_table(header: list[str], rows: list[list[str]], right_aligned: set[int]) -> str:
    """Align ``rows`` under ``header`` in columns two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
