"""Image codecs: round trips on real photographs, resizing as ``to_model_input`` does, and errors.

The photographs are scikit-learn's two bundled sample images (``china.jpg``, ``flower.jpg``,
427x640 RGB) and scikit-image's bundled ``camera`` (512x512 grey); the grey digits are
scikit-learn's bundled 8x8 digits. Nothing is downloaded. The Ray Data test starts a real
one-CPU local Ray and is marked slow.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import skimage.data
import torch
from sklearn.datasets import load_digits, load_sample_images

from dtlray.data.codec import (
    IMAGE_FORMATS,
    DecodeBatch,
    check_encoded,
    decode_images,
    delivered_image_shape,
    encode_images,
)
from dtlray.data.decode import decode_uint8, to_model_input
from dtlray.data.prepare import images_to_table
from dtlray.errors import DtlrayError

FIX = "dtlray data prepare NAME --force"

# Mean absolute error of a JPEG round trip at JPEG_QUALITY (90), in grey levels. Measured on these
# crops: 1.7 (48x64 RGB), 2.9 (224 px RGB), 2.2 (8x8 digits). A bug that shifts, transposes or
# swaps channels gives tens of levels; 4 leaves room for libjpeg versions without hiding one.
JPEG_MAE_BOUND = 4.0


def _photo_crops(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(count, height, width, 3)`` uint8 random crops of scikit-learn's sample photographs."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - height + 1)
        x = rng.integers(0, photo.shape[1] - width + 1)
        crops.append(photo[y : y + height, x : x + width])
    return np.stack(crops)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """12 RGB photo crops, 48x64 (H x W): non-square, so height and width cannot be swapped."""
    return _photo_crops(12, 48, 64)


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    """12 grey crops of scikit-image's ``camera``, 40x40x1."""
    camera = skimage.data.camera()
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, 512 - 40, size=(2, 12))
    return np.stack([camera[y : y + 40, x : x + 40, None] for y, x in zip(ys, xs, strict=True)])


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """64 of scikit-learn's 8x8 digits as 8x8x1 uint8 (0..16 scaled to 0..255)."""
    images = load_digits().images[:64]
    return np.round(images * 255 / 16).astype(np.uint8)[..., None]


def _pixels(array: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Raw rows as ``(N, H, W, C)`` uint8 via the worker's decoder (so its checks run too)."""
    return decode_uint8(array, shape[1:]).permute(0, 2, 3, 1).numpy()


def _images(request: pytest.FixtureRequest, name: str) -> np.ndarray:
    return request.getfixturevalue(name)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rgb", "grey", "digits"])
def test_raw_is_exact_and_the_prepare_layout(request: pytest.FixtureRequest, name: str) -> None:
    images = _images(request, name)
    encoded = encode_images(images, "raw")
    assert encoded.type == pa.binary() and len(encoded) == len(images)
    # byte for byte what prepare has always stored
    assert encoded.equals(images_to_table(images, np.zeros(len(images))).column("image").chunk(0))
    check_encoded(encoded, "raw")
    decoded = decode_images(encoded, "raw", images.shape[1:])
    np.testing.assert_array_equal(_pixels(decoded, images.shape), images)


@pytest.mark.parametrize("name", ["rgb", "grey", "digits"])
def test_png_is_lossless(request: pytest.FixtureRequest, name: str) -> None:
    images = _images(request, name)
    encoded = encode_images(images, "png")
    assert all(row.startswith(b"\x89PNG") for row in encoded.to_pylist())
    check_encoded(encoded, "png")
    decoded = decode_images(encoded, "png", images.shape[1:])
    np.testing.assert_array_equal(_pixels(decoded, images.shape), images)


@pytest.mark.parametrize("name", ["rgb", "grey", "digits"])
def test_jpeg_is_close(request: pytest.FixtureRequest, name: str) -> None:
    images = _images(request, name)
    encoded = encode_images(images, "jpeg")
    assert all(row.startswith(b"\xff\xd8\xff") for row in encoded.to_pylist())
    check_encoded(encoded, "jpeg")
    decoded = _pixels(decode_images(encoded, "jpeg", images.shape[1:]), images.shape)
    error = np.abs(decoded.astype(np.int16) - images).mean()
    assert 0 < error < JPEG_MAE_BOUND


def test_jpeg_at_224_px_is_under_a_fifth_of_raw() -> None:
    images = _photo_crops(4, 224, 224, seed=2)
    assert encode_images(images, "jpeg").nbytes <= images.nbytes / 5


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_encoding_is_deterministic(rgb: np.ndarray, image_format: str) -> None:
    # prepare promises byte-identical datasets for equal recipes
    assert encode_images(rgb, image_format).equals(encode_images(rgb, image_format))


# -- resizing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [("rgb", 16), ("rgb", 100), ("grey", 24), ("digits", 32)],
    ids=["rgb-shrink", "rgb-enlarge", "grey-shrink", "digits-enlarge"],
)
def test_resize_matches_to_model_input(
    request: pytest.FixtureRequest, name: str, size: int
) -> None:
    images = _images(request, name)
    channels = images.shape[-1]
    raw = encode_images(images, "raw")
    resized = decode_images(raw, "raw", images.shape[1:], size)
    assert delivered_image_shape(images.shape[1:], size) == (size, size, channels)
    ours = decode_uint8(resized, (size, size, channels))  # (B, C, size, size)
    # what the worker does with raw rows at the stored size, back in grey levels
    theirs = to_model_input(decode_uint8(raw, images.shape[1:]), size, channels) * 127.5 + 127.5
    difference = (ours.to(torch.float32) - theirs).abs()
    assert difference.mean() < 0.5  # rounding to uint8 is up to 0.5 itself
    assert difference.max() < 1.5


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_encoded_rows_resize_to_the_output_size(rgb: np.ndarray, image_format: str) -> None:
    encoded = encode_images(rgb, image_format)
    from_raw = decode_images(encode_images(rgb, "raw"), "raw", rgb.shape[1:], 20)
    decoded = decode_images(encoded, image_format, rgb.shape[1:], 20)
    pixels = _pixels(decoded, (len(rgb), 20, 20, 3))
    bound = 0 if image_format == "png" else JPEG_MAE_BOUND  # shrinking smooths JPEG's error
    assert np.abs(pixels.astype(np.int16) - _pixels(from_raw, pixels.shape)).mean() <= bound


def test_raw_at_the_stored_size_comes_back_as_it_is(rgb: np.ndarray) -> None:
    raw = encode_images(rgb, "raw")
    assert decode_images(raw, "raw", rgb.shape[1:]) is raw
    assert decode_images(raw, "raw", (48, 64, 3), None) is raw


def test_chunked_and_sliced_columns(rgb: np.ndarray) -> None:
    encoded = encode_images(rgb, "jpeg")
    whole = decode_images(encoded, "jpeg", rgb.shape[1:], 16)
    chunked = pa.chunked_array([encoded.slice(0, 5), encoded.slice(5)])
    assert decode_images(chunked, "jpeg", rgb.shape[1:], 16).equals(whole)
    assert decode_images(encoded.slice(3, 4), "jpeg", rgb.shape[1:], 16).equals(whole.slice(3, 4))
    large = encoded.cast(pa.large_binary())
    assert decode_images(large, "jpeg", rgb.shape[1:], 16).equals(whole)
    empty = decode_images(encoded.slice(0, 0), "jpeg", rgb.shape[1:], 16)
    assert len(empty) == 0


def test_decode_batch_replaces_only_the_image_column(rgb: np.ndarray) -> None:
    labels = np.arange(len(rgb), dtype=np.int64)
    table = pa.table({"image": encode_images(rgb, "png"), "label": labels})
    decode = pickle.loads(pickle.dumps(DecodeBatch("png", [48, 64, 3], out_size=16)))
    assert decode.image_shape == (16, 16, 3) and decode.stored_shape == (48, 64, 3)
    out = decode(table)
    assert out.column_names == ["image", "label"]
    assert out.column("label").to_pylist() == labels.tolist()
    expected = decode_images(encode_images(rgb, "raw"), "raw", rgb.shape[1:], 16)
    assert out.column("image").chunk(0).equals(expected)
    raw_table = pa.table({"image": encode_images(rgb, "raw"), "label": labels})
    assert DecodeBatch("raw", (48, 64, 3))(raw_table) is raw_table


# -- errors --------------------------------------------------------------------------------------


def test_a_png_dataset_holding_jpeg_files(rgb: np.ndarray) -> None:
    with pytest.raises(DtlrayError) as caught:
        decode_images(encode_images(rgb, "jpeg"), "png", rgb.shape[1:], dataset="photos")
    message = str(caught.value)
    assert "12 of 12 image rows" in message and "hold JPEG files" in message
    assert "records image_format 'png'" in message
    assert "dtlray data prepare photos --force" in message
    assert "\n" not in message


def test_raw_rows_read_as_jpeg(rgb: np.ndarray) -> None:
    with pytest.raises(DtlrayError, match="no PNG or JPEG signature") as caught:
        check_encoded(encode_images(rgb, "raw"), "jpeg")
    assert "records image_format 'jpeg'" in str(caught.value) and FIX in str(caught.value)


def test_one_foreign_row_is_named(rgb: np.ndarray) -> None:
    rows = encode_images(rgb, "jpeg").to_pylist()
    rows[7] = encode_images(rgb[7:8], "png")[0].as_py()
    with pytest.raises(DtlrayError, match=r"1 of 12 image rows in the batch \(first: row 7\)"):
        check_encoded(pa.array(rows, pa.binary()), "jpeg")


def test_a_raw_dataset_holding_png_files(rgb: np.ndarray) -> None:
    with pytest.raises(DtlrayError, match="hold PNG files, .* records image_format 'raw'"):
        check_encoded(encode_images(rgb, "png"), "raw")


def test_raw_rows_of_the_wrong_length(rgb: np.ndarray) -> None:
    with pytest.raises(DtlrayError, match=rf"has 9216 bytes, but .* needs 3072 .*{FIX}"):
        decode_images(encode_images(rgb, "raw"), "raw", (32, 32, 3), 16)


def test_grey_jpeg_in_an_rgb_dataset(grey: np.ndarray) -> None:
    with pytest.raises(DtlrayError) as caught:
        decode_images(encode_images(grey, "jpeg"), "jpeg", (40, 40, 3), 32)
    message = str(caught.value)
    assert "row 0 of the batch decodes to JPEG L 40x40" in message
    assert "records JPEG RGB 40x40" in message and FIX in message


def test_wrong_stored_size(rgb: np.ndarray) -> None:
    with pytest.raises(DtlrayError, match=r"decodes to PNG RGB 48x64 .* records PNG RGB 64x48"):
        decode_images(encode_images(rgb, "png"), "png", (64, 48, 3))


def test_a_damaged_file(rgb: np.ndarray) -> None:
    rows = encode_images(rgb, "jpeg").to_pylist()
    rows[2] = rows[2][: len(rows[2]) // 2]  # truncated: the header is intact, the scan is not
    with pytest.raises(DtlrayError, match=rf"row 2 of the batch is a damaged JPEG file .*{FIX}"):
        decode_images(pa.array(rows, pa.binary()), "jpeg", rgb.shape[1:])


def test_null_rows(rgb: np.ndarray) -> None:
    rows = encode_images(rgb, "png").to_pylist()
    rows[1] = None
    with pytest.raises(DtlrayError, match=f"1 image rows are null: .*{FIX}"):
        decode_images(pa.array(rows, pa.binary()), "png", rgb.shape[1:])


def test_unknown_format_lists_the_valid_ones(rgb: np.ndarray) -> None:
    with pytest.raises(DtlrayError, match="unknown image format 'webp': choose one of raw, png"):
        encode_images(rgb, "webp")
    with pytest.raises(DtlrayError, match="unknown image format"):
        DecodeBatch("gif", (48, 64, 3))


@pytest.mark.parametrize(
    ("shape", "size"), [((48, 64, 4), None), ((0, 64, 3), None), ((48, 64, 3), 0)]
)
def test_bad_shapes_and_sizes(shape: tuple[int, int, int], size: int | None) -> None:
    with pytest.raises(ValueError):
        DecodeBatch("png", shape, size)


# -- in Ray Data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for Ray Data: the one already running (the integration tests' session Ray,
    when they ran first), else a 1-CPU one of its own, shut down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["from_arrow", "read_parquet"])
def test_decode_batch_in_ray_data(
    local_ray: None, tmp_path: Path, rgb: np.ndarray, source: str
) -> None:
    labels = np.arange(len(rgb), dtype=np.int64)
    table = pa.table({"image": encode_images(rgb, "jpeg"), "label": labels})
    if source == "from_arrow":
        ds = ray.data.from_arrow(table)
    else:  # the shards' path: Parquet may come back as large_binary or binary_view
        pq.write_table(table.slice(0, 7), tmp_path / "part-0.parquet")
        pq.write_table(table.slice(7), tmp_path / "part-1.parquet")
        files = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
        ds = ray.data.read_parquet(files)
    decode = DecodeBatch("jpeg", rgb.shape[1:], out_size=16)
    ds = ds.map_batches(decode, batch_format="pyarrow", batch_size=5)
    images, seen = [], []
    for batch in ds.iter_batches(batch_size=4, batch_format="pyarrow"):
        images.append(decode_uint8(batch["image"], decode.image_shape))  # (b, 3, 16, 16)
        seen.extend(batch["label"].to_pylist())
    order = np.argsort(seen)
    assert sorted(seen) == labels.tolist()
    expected = decode_uint8(decode_images(table["image"], "jpeg", rgb.shape[1:], 16), (16, 16, 3))
    assert torch.equal(torch.cat(images)[torch.from_numpy(order)], expected)


def test_the_codec_imports_neither_torch_nor_ray() -> None:
    # Ray Data ships DecodeBatch to its workers; prepare encodes without the heavy stack.
    code = (
        "import sys, dtlray.data.codec\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
