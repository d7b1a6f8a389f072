"""Data: prepare raw images into Parquet shards once, then stream them to training.

Prepare (offline, once)::

    info = prepare_builtin("digits")                      # or prepare_image_folder(DIR, NAME)

Read (every trial)::

    info = load_info("digits")
    ds = open_split(info, "train", shuffle_files=True)     # ray.data.Dataset, validated first
    shape = info.image_shape
    if info.image_format != "raw":                         # PNG/JPEG: Ray Data decodes them
        decode = DecodeBatch(info.image_format, info.image_shape, out_size=32)
        ds, shape = ds.map_batches(decode, batch_format="pyarrow"), decode.image_shape
    for batch in ds.iter_batches(batch_format="pyarrow"):
        images = decode_uint8(batch["image"], shape)        # (B, C, H, W) uint8
        x = to_model_input(images.to(device), size=32, channels=3)

The decode functions (torch) load on first use and :func:`open_split` imports Ray when called, so
``dtlray data prepare`` and ``dtlray data list`` import neither torch nor Ray (torchvision only
for ``prepare fashion-mnist --download``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dtlray.data.builtins import FASHION_MNIST_CLASSES, build_builtin, prepare_builtin
from dtlray.data.codec import IMAGE_FORMATS, DecodeBatch
from dtlray.data.folder import build_image_folder, prepare_image_folder
from dtlray.data.layout import (
    BUILTIN_DATASETS,
    SPLITS,
    DatasetInfo,
    DatasetNotPrepared,
    Provenance,
    ShardInfo,
    load_info,
    resolve_root,
    validate_name,
)
from dtlray.data.prepare import Prepared
from dtlray.data.read import open_split, read_split_labels, read_split_table, validate_split

if TYPE_CHECKING:
    from dtlray.data.decode import decode_uint8, to_model_input

# name -> module, imported on first use (torch takes seconds to import)
_LAZY = {
    "decode_uint8": "dtlray.data.decode",
    "to_model_input": "dtlray.data.decode",
}

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_FORMATS",
    "FASHION_MNIST_CLASSES",
    "SPLITS",
    "DatasetInfo",
    "DatasetNotPrepared",
    "DecodeBatch",
    "Prepared",
    "Provenance",
    "ShardInfo",
    "build_builtin",
    "build_image_folder",
    "decode_uint8",
    "load_info",
    "open_split",
    "prepare_builtin",
    "prepare_image_folder",
    "read_split_labels",
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
