"""The Ray Data read path on a real local Ray: open_split -> Arrow/numpy batches -> tensors."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dtlray.data import (
    decode_uint8,
    load_info,
    open_split,
    prepare_builtin,
    read_split_table,
    to_model_input,
)
from dtlray.errors import DtlrayError

pytestmark = pytest.mark.slow  # starts a real local Ray


def test_open_split_streams_every_row_once(ray_cluster: None, tmp_path: Path) -> None:
    info = prepare_builtin("fashion-mnist", tmp_path, limit=12_000)  # train: 2 shards
    assert len(info.files["train"]) == 2
    dataset = open_split(info, "train", shuffle_files=True)
    labels: list[int] = []
    pixel_sum = 0
    # As the worker reads a streamed split: Arrow batches, uint8 decode, convert on the device.
    for batch in dataset.iter_batches(batch_size=1000, batch_format="pyarrow"):
        images = decode_uint8(batch["image"], info.image_shape)
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
        x = to_model_input(images, 32, 3)
        assert x.shape == (len(images), 3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        labels += batch["label"].to_pylist()
        pixel_sum += int(images.sum())
    table = read_split_table(info, "train")
    assert len(labels) == info.splits["train"] == 12_000
    assert Counter(labels) == Counter(table["label"].to_pylist())
    stored = np.frombuffer(b"".join(table["image"].to_pylist()), dtype=np.uint8)
    assert pixel_sum == int(stored.sum(dtype=np.int64))


def test_numpy_batches_decode_to_model_input(ray_cluster: None, data_root: Path) -> None:
    info = load_info("digits", data_root)
    rows = 0
    for batch in open_split(info, "val").iter_batches(batch_size=100, batch_format="numpy"):
        assert batch["image"].dtype == object  # Ray hands binary columns over as bytes objects
        x = to_model_input(decode_uint8(batch["image"], info.image_shape), 16, 1)
        assert x.shape == (len(batch["label"]), 1, 16, 16)
        rows += len(x)
    assert rows == info.splits["val"]


def test_open_split_validates_before_reading(
    ray_cluster: None, data_root: Path, tmp_path: Path
) -> None:
    shutil.copytree(data_root / "faces", tmp_path / "faces")
    info = load_info("faces", tmp_path)
    path = Path(info.split_files("test")[0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DtlrayError, match=f"{path} has .* bytes.*--force"):
        open_split(info, "test")
