"""Reading: validate_split against tampered files, load_info errors, and the decoders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dtlray.data import (
    SPLITS,
    DatasetInfo,
    decode_uint8,
    load_info,
    read_split_table,
    resolve_root,
    to_model_input,
    validate_split,
)
from dtlray.data.layout import ShardInfo, compute_fingerprint
from dtlray.errors import DtlrayError


@pytest.fixture
def faces(data_root: Path, tmp_path: Path) -> DatasetInfo:
    """A private copy of the prepared faces dataset, free to damage."""
    shutil.copytree(data_root / "faces", tmp_path / "faces")
    return load_info("faces", tmp_path)


def rewrite_shard(info: DatasetInfo, table: pa.Table) -> tuple[DatasetInfo, Path]:
    """Replace train's first shard with ``table`` and make dataset.json agree with it."""
    path = Path(info.split_files("train")[0])
    pq.write_table(table, path)
    payload = path.read_bytes()
    shard = ShardInfo(
        file="train/part-00000.parquet",
        rows=table.num_rows,
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    files = {**info.files, "train": (shard,)}
    data = json.loads((Path(info.path) / "dataset.json").read_text())
    data["files"]["train"] = [shard.model_dump()]
    data["splits"]["train"] = table.num_rows
    data["fingerprint"] = compute_fingerprint(info.classes, info.image_shape, files)
    (Path(info.path) / "dataset.json").write_text(json.dumps(data))
    return load_info(info.name, info.root), path


def test_valid_splits_pass(faces: DatasetInfo) -> None:
    for split in SPLITS:
        validate_split(faces, split)
    assert read_split_table(faces, "train").num_rows == faces.splits["train"]


def test_unknown_split(faces: DatasetInfo) -> None:
    with pytest.raises(DtlrayError, match="no split 'training': use one of train, val, test"):
        validate_split(faces, "training")


def test_missing_file(faces: DatasetInfo) -> None:
    path = Path(faces.split_files("test")[0])
    path.unlink()
    with pytest.raises(DtlrayError) as err:
        validate_split(faces, "test")
    assert f"{path} is listed in dataset.json but missing" in str(err.value)
    assert "dtlray data prepare faces --root" in str(err.value) and "--force" in str(err.value)


def test_extra_file(faces: DatasetInfo) -> None:
    extra = Path(faces.path) / "val" / "part-00001.parquet"
    shutil.copy(Path(faces.split_files("val")[0]), extra)
    with pytest.raises(DtlrayError, match=f"{extra} is not listed in dataset.json"):
        validate_split(faces, "val")


def test_truncated_shard(faces: DatasetInfo) -> None:
    path = Path(faces.split_files("train")[0])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DtlrayError, match=f"{path} has \\d+ bytes but dataset.json says.*--force"):
        validate_split(faces, "train")


def test_tampered_shard_same_size(faces: DatasetInfo) -> None:
    path = Path(faces.split_files("train")[0])
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(DtlrayError, match=f"{path} does not match the sha256.*--force"):
        validate_split(faces, "train")
    validate_split(faces, "train", check_hashes=False)  # the cheap checks cannot see it


def test_garbage_shard_with_matching_size(faces: DatasetInfo) -> None:
    path = Path(faces.split_files("val")[0])
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(DtlrayError, match=f"{path} is not a readable Parquet file"):
        validate_split(faces, "val")


def test_missing_label_column(faces: DatasetInfo) -> None:
    table = read_split_table(faces, "train").drop_columns(["label"])
    info, path = rewrite_shard(faces, table)
    with pytest.raises(DtlrayError, match=f"{path} has no 'label' column.*--force"):
        validate_split(info, "train")


def test_image_column_of_wrong_type(faces: DatasetInfo) -> None:
    table = read_split_table(faces, "train")
    table = table.set_column(0, "image", pa.array(range(table.num_rows), pa.int64()))
    info, path = rewrite_shard(faces, table)
    with pytest.raises(DtlrayError, match=f"{path} column 'image' is int64, expected binary"):
        validate_split(info, "train")


def test_label_column_of_wrong_type(faces: DatasetInfo) -> None:
    table = read_split_table(faces, "train")
    table = table.set_column(1, "label", pa.array(["face"] * table.num_rows))
    info, path = rewrite_shard(faces, table)
    with pytest.raises(DtlrayError, match=f"{path} column 'label' is string, expected integer"):
        validate_split(info, "train")


def test_labels_out_of_range(faces: DatasetInfo) -> None:
    table = read_split_table(faces, "train")
    labels = np.zeros(table.num_rows, dtype=np.int64)
    labels[5] = 2  # faces has 2 classes
    info, path = rewrite_shard(faces, table.set_column(1, "label", pa.array(labels)))
    with pytest.raises(DtlrayError, match=f"{path} has labels in \\[0, 2\\], outside \\[0, 2\\)"):
        validate_split(info, "train")


def test_edited_dataset_json(faces: DatasetInfo) -> None:
    info_file = Path(faces.path) / "dataset.json"
    data = json.loads(info_file.read_text())
    data["files"]["val"][0]["rows"] += 1
    data["splits"]["val"] += 1
    info_file.write_text(json.dumps(data))
    with pytest.raises(DtlrayError, match="dataset.json is not a valid.*fingerprint.*--force"):
        load_info("faces", faces.root)


def test_load_info_missing_says_how_to_prepare(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DtlrayError) as err:
        load_info("digits", tmp_path)
    assert f"dataset 'digits' is not prepared in {tmp_path}" in str(err.value)
    assert f"`dtlray data prepare digits --root {tmp_path}`" in str(err.value)
    with pytest.raises(DtlrayError, match="prepared there: digits, faces, fashion-mnist.*--name"):
        load_info("mine", data_root)


def test_resolve_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DTLRAY_DATA", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "arg") == str(tmp_path / "arg")
    assert resolve_root(None) == str(tmp_path / "env")
    monkeypatch.setenv("DTLRAY_DATA", "s3://bucket/data/")
    assert resolve_root(None) == "s3://bucket/data"  # URIs pass unchanged, no trailing /
    assert resolve_root("gs://other") == "gs://other"
    monkeypatch.delenv("DTLRAY_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root(None) == str(tmp_path / "home" / ".cache" / "dtlray" / "data")
    monkeypatch.chdir(tmp_path)
    assert resolve_root("rel") == str(tmp_path / "rel")


# --- decoding ------------------------------------------------------------------------------------


def _rows(count: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def _binary(images: np.ndarray, large: bool = False) -> pa.Array:
    return pa.array([row.tobytes() for row in images], pa.large_binary() if large else pa.binary())


@pytest.mark.parametrize(
    "form", ["binary", "large_binary", "sliced", "chunked", "fixed", "object", "list", "bytes_S"]
)
def test_decode_uint8_inputs(form: str) -> None:
    shape = (5, 4, 3)
    images = _rows(10, shape)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    batch: object
    if form == "binary":
        batch = _binary(images)
    elif form == "large_binary":
        batch = _binary(images, large=True)
    elif form == "sliced":  # offsets that do not start at 0
        batch = _binary(np.concatenate([_rows(3, shape, 1), images]))[3:]
    elif form == "chunked":
        batch = pa.chunked_array([_binary(images[:4]), _binary(images[4:])])
    elif form == "fixed":
        batch = pa.array([row.tobytes() for row in images], pa.binary(60))
    elif form == "object":  # what Ray's numpy batches hold
        batch = np.array([row.tobytes() for row in images], dtype=object)
    elif form == "list":
        batch = [row.tobytes() for row in images]
    else:
        batch = np.array([row.tobytes() for row in images], dtype="S60")
    decoded = decode_uint8(batch, shape)
    assert decoded.dtype == torch.uint8 and decoded.shape == (10, 3, 5, 4)
    assert torch.equal(decoded, expected)


def test_decode_uint8_is_a_view_of_the_arrow_buffer_until_one_copy() -> None:
    images = _rows(4, (2, 2, 1))
    array = _binary(images)
    decoded = decode_uint8(array, (2, 2, 1))
    decoded[0, 0, 0, 0] = 7  # the result owns its memory: the Arrow buffer is untouched
    assert array[0].as_py() == images[0].tobytes()


@pytest.mark.parametrize("form", ["arrow", "object"])
def test_decode_uint8_rejects_wrong_row_length(form: str) -> None:
    rows = [b"\0" * 12, b"\0" * 11, b"\0" * 12]
    batch = pa.array(rows) if form == "arrow" else np.array(rows, dtype=object)
    with pytest.raises(DtlrayError, match="image row 1 has 11 bytes, but .* needs 12.*--force"):
        decode_uint8(batch, (2, 2, 3))


def test_decode_uint8_rejects_nulls_and_other_types() -> None:
    with pytest.raises(DtlrayError, match="1 image rows are null"):
        decode_uint8(pa.array([b"\0" * 4, None]), (2, 2, 1))
    with pytest.raises(TypeError, match="got int"):
        decode_uint8(3, (2, 2, 1))  # type: ignore[arg-type]


def test_decode_empty_batch() -> None:
    assert decode_uint8(pa.array([], pa.binary()), (3, 3, 1)).shape == (0, 1, 3, 3)
    assert decode_uint8(np.array([], dtype=object), (3, 3, 3)).shape == (0, 3, 3, 3)


@pytest.mark.parametrize(
    ("shape", "size", "channels"),
    [
        ((8, 8, 1), 8, 1),  # nothing to do but scale
        ((8, 8, 1), 32, 3),  # upsample, grey -> RGB
        ((28, 28, 1), 14, 3),  # downsample (antialiased)
        ((25, 25, 1), 48, 1),
        ((16, 12, 3), 10, 1),  # RGB -> grey, non-square
        ((32, 32, 3), 224, 3),
    ],
)
def test_to_model_input_shapes_and_range(
    shape: tuple[int, int, int], size: int, channels: int
) -> None:
    images = _rows(6, shape)
    images[0] = 0
    images[1] = 255
    x = to_model_input(decode_uint8(_binary(images), shape), size, channels)
    assert x.dtype == torch.float32 and x.shape == (6, channels, size, size)
    assert x.is_contiguous()
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))
    if channels == 3 and shape[2] == 1:
        assert torch.equal(x[:, 0], x[:, 2])


def test_to_model_input_values() -> None:
    pixels = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    x = to_model_input(pixels, 2, 1, mean=0.0, std=1.0)
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255
    grey = to_model_input(red, 2, 1, mean=0.0, std=1.0)
    assert torch.allclose(grey, torch.full((1, 1, 2, 2), 0.299))
    normalised = to_model_input(pixels, 2, 1, mean=0.5, std=0.25)
    assert torch.allclose(normalised.flatten(), (torch.tensor([0.0, 1.0, 0.2, 0.4]) - 0.5) / 0.25)


def test_downsampling_is_antialiased() -> None:
    stripes = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    stripes[..., ::2] = 255  # one-pixel stripes: should average to grey, not alias to 0 or 255
    x = to_model_input(stripes, 8, 1, mean=0.0, std=1.0)
    assert torch.allclose(x, torch.full_like(x, 0.5), atol=0.05)  # edges see fewer stripes


def test_to_model_input_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8 tensor"):
        to_model_input(torch.zeros(1, 1, 4, 4), 4, 1)
    with pytest.raises(ValueError, match="channels in 1|3"):
        to_model_input(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 4, 2)


def test_a_prepared_split_decodes_to_model_input(data_root: Path) -> None:
    info = load_info("digits", data_root)
    table = read_split_table(info, "val")
    images = decode_uint8(table["image"], info.image_shape)
    assert images.dtype == torch.uint8 and images.shape == (270, 1, 8, 8)
    stored = np.frombuffer(b"".join(table["image"].to_pylist()), dtype=np.uint8)
    np.testing.assert_array_equal(
        images.numpy(), stored.reshape(270, 8, 8, 1).transpose(0, 3, 1, 2)
    )
    # Ray's numpy batches hold the rows as bytes objects; they decode to the same tensor.
    numpy_rows = table["image"].to_numpy(zero_copy_only=False)
    assert torch.equal(decode_uint8(numpy_rows, info.image_shape), images)
    x = to_model_input(images, 16, 3)
    assert x.shape == (270, 3, 16, 16) and x.dtype == torch.float32
