"""Data: prepare raw images into Parquet shards once, then stream them to training.

Prepare (offline, once)::

    info = prepare_builtin("digits")                      # or prepare_image_folder(DIR, NAME)

Read (every trial)::

    info = load_info("digits")
    ds = open_split(info, "train", shuffle_files=True)     # ray.data.Dataset, validated first
    for images, labels in ds.iter_torch_batches(collate_fn=make_collate_fn(info.image_shape)):
        x = to_model_input(images, size=32, channels=3)    # on the worker's device

The decode functions (torch) and the collate function (Ray) load on first use, so ``dtlray data``
commands stay quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dtlray.data.builtins import FASHION_MNIST_CLASSES, build_builtin, prepare_builtin
from dtlray.data.folder import build_image_folder, prepare_image_folder
from dtlray.data.layout import (
    BUILTIN_DATASETS,
    SPLITS,
    DatasetInfo,
    Provenance,
    ShardInfo,
    load_info,
    resolve_root,
    validate_name,
)
from dtlray.data.prepare import Prepared
from dtlray.data.read import open_split, read_split_table, validate_split

if TYPE_CHECKING:
    from dtlray.data.collate import ImageBatchCollate, make_collate_fn
    from dtlray.data.decode import decode_images, decode_uint8, to_model_input

# name -> module, imported on first use (torch and ray take seconds to import)
_LAZY = {
    "ImageBatchCollate": "dtlray.data.collate",
    "make_collate_fn": "dtlray.data.collate",
    "decode_images": "dtlray.data.decode",
    "decode_uint8": "dtlray.data.decode",
    "to_model_input": "dtlray.data.decode",
}

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_CLASSES",
    "SPLITS",
    "DatasetInfo",
    "ImageBatchCollate",
    "Prepared",
    "Provenance",
    "ShardInfo",
    "build_builtin",
    "build_image_folder",
    "decode_images",
    "decode_uint8",
    "load_info",
    "make_collate_fn",
    "open_split",
    "prepare_builtin",
    "prepare_image_folder",
    "read_split_table",
    "resolve_root",
    "to_model_input",
    "validate_name",
    "validate_split",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
