"""Datasets stored as raw pixels, PNG or JPEG: prepare records the format, reads honour it."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from dtlray.cli import main
from dtlray.data import load_info, prepare_builtin, prepare_image_folder, read_split_table
from dtlray.data.codec import IMAGE_FORMATS, decode_images
from dtlray.data.folder import ENCODE_FROM_SIZE
from dtlray.data.layout import DatasetInfo
from dtlray.errors import DtlrayError

CROPS_PER_CLASS = 30


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 256x256 PNG crops of scikit-learn's two sample photographs."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
        (folder / label).mkdir()
        for number in range(CROPS_PER_CLASS):
            y = rng.integers(0, photo.shape[0] - 256)
            x = rng.integers(0, photo.shape[1] - 256)
            crop = photo[y : y + 256, x : x + 256]
            Image.fromarray(crop).save(folder / label / f"{number}.png")
    return folder


def stored_bytes(info: DatasetInfo) -> int:
    return sum(shard.bytes for shards in info.files.values() for shard in shards)


def pixels(info: DatasetInfo, split: str) -> np.ndarray:
    table = read_split_table(info, split)
    rows = decode_images(table["image"], info.image_format, info.image_shape)
    return np.frombuffer(rows.buffers()[2], dtype=np.uint8).reshape(-1, *info.image_shape)


def test_the_format_literal_lists_the_codec_formats() -> None:
    assert get_args(DatasetInfo.model_fields["image_format"].annotation) == IMAGE_FORMATS


def test_a_224_px_folder_defaults_to_jpeg_at_under_a_fifth_of_raw(
    photo_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", "prepare", "--image-folder", str(photo_folder), "--root", str(tmp_path)]
    assert main([*argv, "--name", "photos", "--image-size", "224"]) == 0
    assert "224x224x3 jpeg, in" in capsys.readouterr().out
    jpeg = load_info("photos", tmp_path)
    assert jpeg.image_format == "jpeg" and jpeg.provenance.arguments["image_format"] == "jpeg"
    assert (
        main([*argv, "--name", "photos-raw", "--image-size", "224", "--image-format", "raw"]) == 0
    )
    raw = load_info("photos-raw", tmp_path)
    assert raw.image_format == "raw" and "image_format" not in raw.provenance.arguments
    assert stored_bytes(jpeg) <= stored_bytes(raw) / 5, (stored_bytes(jpeg), stored_bytes(raw))
    # Same split, same images: the JPEG decodes close to the raw pixels.
    error = np.abs(pixels(jpeg, "train").astype(int) - pixels(raw, "train")).mean()
    assert error < 4.0, error

    capsys.readouterr()
    main(["data", "list", "--root", str(tmp_path)])
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[-4] for line in listing[2:]] == ["jpeg", "raw"]

    # Asking for another format is another recipe: refused without --force, like any argument.
    with pytest.raises(DtlrayError, match="image_format='jpeg'.*image_format='png'.*--force"):
        prepare_image_folder(photo_folder, "photos", tmp_path, image_size=224, image_format="png")


def test_png_is_lossless_and_small_folders_stay_raw(photo_folder: Path, tmp_path: Path) -> None:
    small = prepare_image_folder(photo_folder, "small", tmp_path, image_size=ENCODE_FROM_SIZE - 1)
    assert small.image_format == "raw"
    png = prepare_image_folder(
        photo_folder, "small-png", tmp_path, image_size=ENCODE_FROM_SIZE - 1, image_format="png"
    )
    assert png.image_format == "png"
    assert png.fingerprint != small.fingerprint
    for split in ("train", "val", "test"):
        assert np.array_equal(pixels(png, split), pixels(small, split))


def test_builtins_stay_raw_unless_asked(tmp_path: Path) -> None:
    digits = prepare_builtin("digits", tmp_path)
    assert digits.image_format == "raw"
    assert "image_format" not in digits.provenance.arguments  # as before formats existed
    png = prepare_builtin("digits", tmp_path / "png", image_format="png")
    assert png.provenance.arguments["image_format"] == "png"
    assert np.array_equal(pixels(png, "val"), pixels(digits, "val"))
    with pytest.raises(DtlrayError, match="unknown image format 'gif'"):
        prepare_builtin("digits", tmp_path / "gif", image_format="gif")
