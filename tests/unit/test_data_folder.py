"""Preparing a user's image folder: mixed formats and modes, resizing, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtlray.data import SPLITS, load_info, prepare_image_folder, read_split_table, validate_split
from dtlray.errors import DtlrayError

RED = (220, 30, 30)
GREY = (90, 90, 90)
# (mode, extension) of the images of each class; 2 of each kind -> 12 per class
KINDS = {
    "red": [("RGB", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "jpg"), ("RGB", "JPEG")],
    "grey": [("L", "png"), ("L", "jpg"), ("RGB", "png"), ("LA", "png"), ("P", "png")],
}


def _save(path: Path, mode: str, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, color)
    if mode == "P":
        image.convert("P").save(path, transparency=255)  # palette with a transparent index
    elif mode == "JPEG-broken":
        image.save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[:200])  # truncated: header only
    else:
        image.convert(mode).save(path, format="JPEG" if path.suffix.lower() != ".png" else "PNG")


def make_folder(base: Path, per_kind: int = 2) -> Path:
    """A folder with classes red and grey: PNG/JPEG, modes RGB/RGBA/P/L/LA, assorted sizes."""
    folder = base / "photos"
    colors = {"red": RED, "grey": GREY}
    for name, kinds in KINDS.items():
        for index, (mode, extension) in enumerate(kinds * per_kind):
            sub = folder / name / ("nested" if index % 4 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            size = (20 + 7 * index, 30 + 3 * index)  # non-square, each different
            _save(sub / f"{mode}-{index}.{extension}", mode, colors[name], size)
    (folder / "red" / "notes.txt").write_text("not an image: ignored")
    (folder / "grey" / ".hidden.png").write_bytes(b"ignored: hidden")
    return folder


def stored(info_root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    info = load_info(name, info_root)
    images, labels = [], []
    for split in SPLITS:
        table = read_split_table(info, split)
        raw = np.frombuffer(b"".join(table["image"].to_pylist()), dtype=np.uint8)
        images.append(raw.reshape(-1, *info.image_shape))
        labels.append(table["label"].to_numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_mixed_folder_rgb(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    info = prepare_image_folder(folder, "photos", tmp_path / "root", image_size=16, channels=3)
    assert info.classes == ("grey", "red")
    assert info.image_shape == (16, 16, 3)
    assert info.num_rows == 20
    assert set(info.splits) == set(SPLITS) and min(info.splits.values()) >= 2
    args = info.provenance.arguments
    assert args == {
        "image_folder": str(folder),
        "image_size": 16,
        "channels": 3,
        "skip_bad": False,
    }
    images, labels = stored(tmp_path / "root", "photos")
    assert np.bincount(labels).tolist() == [10, 10]
    for label, color in ((0, GREY), (1, RED)):
        mean = images[labels == label].reshape(-1, 3).mean(axis=0)
        assert np.allclose(mean, color, atol=6), (label, mean)


def test_mixed_folder_grey(tmp_path: Path) -> None:
    info = prepare_image_folder(
        make_folder(tmp_path), "g", tmp_path / "root", image_size=8, channels=1
    )
    assert info.image_shape == (8, 8, 1)
    images, labels = stored(tmp_path / "root", "g")
    red_luma = 0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2]
    assert abs(images[labels == 1].mean() - red_luma) < 6
    assert abs(images[labels == 0].mean() - GREY[0]) < 6


def test_images_are_centre_cropped_not_squashed(tmp_path: Path) -> None:
    folder = tmp_path / "wide"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for index in range(8):
            image = Image.new("L", (60, 20), 0)
            image.paste(255, (20, 0, 40, 20))  # a white middle third between black sides
            image.save(folder / name / f"{index}.png")
    prepare_image_folder(folder, "wide", tmp_path / "root", image_size=10, channels=1)
    images, _ = stored(tmp_path / "root", "wide")
    # only the white centre survives the crop (squashing would keep the black sides: mean 85)
    assert images.mean() > 240


def test_unreadable_image_fails_and_leaves_nothing(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    bad = folder / "red" / "broken.jpg"
    _save(bad, "JPEG-broken", RED, (40, 40))
    root = tmp_path / "root"
    with pytest.raises(DtlrayError) as err:
        prepare_image_folder(folder, "photos", root)
    assert str(bad) in str(err.value) and "--skip-bad" in str(err.value)
    assert list(root.iterdir()) == []  # neither the dataset nor a temp dir


def test_skip_bad_skips_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_folder(tmp_path)
    (folder / "red" / "garbage.png").write_bytes(b"this is not a PNG")
    _save(folder / "grey" / "cut.jpg", "JPEG-broken", GREY, (40, 40))
    with caplog.at_level(logging.WARNING, logger="dtlray.data"):
        info = prepare_image_folder(folder, "photos", tmp_path / "root", skip_bad=True)
    assert info.num_rows == 20
    assert "skipped 2 unreadable image(s) of 22" in caplog.text
    assert "2 unreadable skipped" in info.provenance.source


def test_failed_forced_rebuild_keeps_the_old_dataset(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    root = tmp_path / "root"
    old = prepare_image_folder(folder, "photos", root, image_size=8)
    (folder / "red" / "garbage.png").write_bytes(b"not a PNG")
    with pytest.raises(DtlrayError, match="garbage.png"):
        prepare_image_folder(folder, "photos", root, image_size=8, force=True)
    assert load_info("photos", root) == old
    for split in SPLITS:
        validate_split(old, split)
    assert [p.name for p in root.iterdir()] == ["photos"]


def test_rerun_reuses_and_other_size_needs_force(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    root = tmp_path / "root"
    first = prepare_image_folder(folder, "photos", root, image_size=8)
    assert prepare_image_folder(folder, "photos", root, image_size=8) == first
    with pytest.raises(DtlrayError, match="image_size=8.*image_size=12.*--force"):
        prepare_image_folder(folder, "photos", root, image_size=12)
    assert prepare_image_folder(folder, "photos", root, image_size=12, force=True).image_shape == (
        12,
        12,
        3,
    )


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "does not exist.*--image-folder DIR"),
        ("empty", "at least two class sub-folders \\(found none\\)"),
        ("one-class", "at least two class sub-folders \\(found 'only'\\).*own sub-folder"),
        ("empty-class", "class folder .*empty-one has no PNG or JPEG images: add some"),
        ("too-few", "class 'a' has 2 images.*add images"),
    ],
)
def test_bad_folders(tmp_path: Path, setup: str, match: str) -> None:
    folder = tmp_path / "in"
    if setup != "missing":
        folder.mkdir()
    if setup == "one-class":
        (folder / "only").mkdir()
        Image.new("L", (4, 4)).save(folder / "only" / "x.png")
    if setup == "empty-class":
        make_folder(tmp_path)
        folder = tmp_path / "photos"
        (folder / "empty-one").mkdir()
    if setup == "too-few":
        for name in ("a", "b"):
            (folder / name).mkdir()
            for index in range(2):
                Image.new("L", (4, 4)).save(folder / name / f"{index}.png")
    with pytest.raises(DtlrayError, match=match):
        prepare_image_folder(folder, "x", tmp_path / "root")
    assert not (tmp_path / "root" / "x").exists()


@pytest.mark.parametrize("name", ["", "a/b", "../up", "..", ".hidden", "a\\b", "x" * 101])
def test_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(DtlrayError, match="invalid dataset name.*--name my-photos"):
        prepare_image_folder(make_folder(tmp_path), name, tmp_path / "root")


@pytest.mark.parametrize(
    ("size", "channels", "match"),
    [
        (4, 3, "--image-size must be an integer from 8 to 512, got 4"),
        (513, 3, "--image-size must be an integer from 8 to 512, got 513"),
        (32, 2, "--channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 2"),
        (32, 4, "--channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 4"),
    ],
)
def test_bad_size_or_channels(tmp_path: Path, size: int, channels: int, match: str) -> None:
    with pytest.raises(DtlrayError, match=match):
        prepare_image_folder(tmp_path, "x", tmp_path / "root", image_size=size, channels=channels)
    assert not (tmp_path / "root").exists()
