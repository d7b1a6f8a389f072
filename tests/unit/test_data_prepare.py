"""Preparing the built-in datasets: counts, classes, pixels, splits, reuse, atomicity, races."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dtlray.data import (
    BUILTIN_DATASETS,
    FASHION_MNIST_CLASSES,
    SPLITS,
    DatasetInfo,
    load_info,
    prepare_builtin,
    read_split_table,
    validate_split,
)
from dtlray.data.builtins import FASHION_MNIST_DIR, read_idx
from dtlray.data.prepare import Recipe, SourceImages, prepare_dataset
from dtlray.errors import DtlrayError
from tests.conftest import DATA_ROOT_LIMIT

# name -> (rows, classes, image shape, rows per split with limit=DATA_ROOT_LIMIT)
EXPECTED = {
    "digits": (1797, 10, (8, 8, 1), {"train": 1257, "val": 270, "test": 270}),
    "faces": (200, 2, (25, 25, 1), {"train": 140, "val": 30, "test": 30}),
    "fashion-mnist": (70000, 10, (28, 28, 1), dict.fromkeys(SPLITS, DATA_ROOT_LIMIT)),
}


def split_rows(info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 images and (N,) labels of a split."""
    table = read_split_table(info, split)
    images = np.frombuffer(b"".join(table["image"].to_pylist()), dtype=np.uint8)
    return images.reshape(-1, *info.image_shape), table["label"].to_numpy()


def row_hashes(info: DatasetInfo, split: str) -> list[str]:
    images, labels = split_rows(info, split)
    return [
        hashlib.sha256(image.tobytes() + int(label).to_bytes(8, "little")).hexdigest()
        for image, label in zip(images, labels, strict=True)
    ]


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_counts_classes_and_shape(data_root: Path, name: str) -> None:
    info = load_info(name, data_root)
    _, num_classes, shape, splits = EXPECTED[name]
    assert info.num_classes == num_classes
    assert info.image_shape == shape
    assert info.splits == splits
    assert info.provenance.arguments == {"dataset": name, "limit": DATA_ROOT_LIMIT}
    assert info.provenance.seed == 0
    for split in SPLITS:
        validate_split(info, split)
        images, labels = split_rows(info, split)
        assert images.shape == (splits[split], *shape)
        assert set(np.unique(labels)) == set(range(num_classes))  # every class in every split


def test_builtin_class_names(data_root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    assert load_info("fashion-mnist", data_root).classes == tuple(FashionMNIST.classes)
    assert FASHION_MNIST_CLASSES == tuple(FashionMNIST.classes)
    assert load_info("digits", data_root).classes == tuple(str(d) for d in range(10))
    assert load_info("faces", data_root).classes == ("face", "not_face")


def test_full_digits_and_faces_are_whole(data_root: Path) -> None:
    for name in ("digits", "faces"):
        info = load_info(name, data_root)
        assert info.num_rows == EXPECTED[name][0]


def test_fashion_mnist_raw_files_hold_70000_images() -> None:
    counts = {}
    for stem in ("train", "t10k"):
        images = read_idx(FASHION_MNIST_DIR / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_MNIST_DIR / f"{stem}-labels-idx1-ubyte.gz")
        assert images.shape[1:] == (28, 28) and labels.shape == (len(images),)
        counts[stem] = len(images)
    assert counts == {"train": 60000, "t10k": 10000}


def test_pixels_are_scaled_to_uint8_range(data_root: Path) -> None:
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    digits, _ = split_rows(load_info("digits", data_root), "train")
    assert digits.min() == 0 and digits.max() == 255
    assert set(np.unique(digits)) <= {round(v * 255 / 16) for v in range(17)}
    faces, labels = split_rows(load_info("faces", data_root), "train")
    assert faces.max() > 200 and faces.min() < 50
    # a stored face row is one of skimage's first 100 images, rounded to uint8
    raw = np.rint(lfw_subset() * 255).astype(np.uint8)
    index = next(i for i, row in enumerate(raw) if np.array_equal(row, faces[0, ..., 0]))
    assert (index < 100) == (labels[0] == 0)
    raw_digits = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    assert any(np.array_equal(row, digits[0, ..., 0]) for row in raw_digits)


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_splits_are_stratified_and_disjoint(data_root: Path, name: str) -> None:
    info = load_info(name, data_root)
    labels = {split: split_rows(info, split)[1] for split in SPLITS}
    overall = Counter(np.concatenate(list(labels.values())).tolist())
    total = sum(overall.values())
    for split, split_labels in labels.items():
        counts = Counter(split_labels.tolist())
        for label, count in overall.items():
            expected = len(split_labels) * count / total
            assert abs(counts[label] - expected) <= 1.5, (split, label, counts[label], expected)
    hashes = {split: set(row_hashes(info, split)) for split in SPLITS}
    assert sum(len(h) for h in hashes.values()) == info.num_rows  # no duplicates inside splits
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_fashion_mnist_keeps_the_official_test_split(data_root: Path) -> None:
    info = load_info("fashion-mnist", data_root)
    official = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    official_rows = {row.tobytes() for row in official}
    test_images, _ = split_rows(info, "test")
    train_images, _ = split_rows(info, "train")
    assert all(row.tobytes() in official_rows for row in test_images)
    assert not any(row.tobytes() in official_rows for row in train_images)


def test_same_seed_same_fingerprint_other_seed_differs(tmp_path: Path) -> None:
    first = prepare_builtin("digits", tmp_path / "a", seed=0)
    again = prepare_builtin("digits", tmp_path / "b", seed=0)
    other = prepare_builtin("digits", tmp_path / "c", seed=1)
    assert first.fingerprint == again.fingerprint
    assert [f.sha256 for f in first.files["train"]] == [f.sha256 for f in again.files["train"]]
    assert first.fingerprint != other.fingerprint
    assert first.splits == other.splits


def test_rerun_reuses_and_force_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = prepare_builtin("faces", tmp_path)
    created = first.provenance.created
    with caplog.at_level(logging.INFO, logger="dtlray.data"):
        again = prepare_builtin("faces", tmp_path)
    assert "reusing" in caplog.text
    assert again == first
    with pytest.raises(DtlrayError, match="other arguments.*--force"):
        prepare_builtin("faces", tmp_path, seed=3)
    rebuilt = prepare_builtin("faces", tmp_path, seed=3, force=True)
    assert rebuilt.provenance.seed == 3 and rebuilt.fingerprint != first.fingerprint
    assert load_info("faces", tmp_path) == rebuilt
    assert rebuilt.provenance.created >= created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]  # no temp or old dir left


def test_limit_is_recorded_and_changes_arguments(tmp_path: Path) -> None:
    info = prepare_builtin("digits", tmp_path, limit=50)
    assert info.splits == {"train": 50, "val": 50, "test": 50}
    assert info.provenance.arguments["limit"] == 50
    with pytest.raises(DtlrayError, match="limit=50.*limit=None"):
        prepare_builtin("digits", tmp_path)


def test_reuse_refuses_a_damaged_dataset(tmp_path: Path) -> None:
    info = prepare_builtin("faces", tmp_path)
    Path(info.split_files("val")[0]).unlink()
    with pytest.raises(DtlrayError, match=r"val/part-00000\.parquet.*missing.*--force"):
        prepare_builtin("faces", tmp_path)
    assert prepare_builtin("faces", tmp_path, force=True).splits == info.splits


def _tiny_source(classes: tuple[str, ...] = ("a", "b"), rows: int = 40) -> SourceImages:
    rng = np.random.default_rng(0)
    return SourceImages(
        classes=classes,
        images=rng.integers(0, 256, size=(rows, 4, 4, 1), dtype=np.uint8),
        labels=np.arange(rows, dtype=np.int64) % len(classes),
        source="test",
    )


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def load() -> SourceImages:
        raise DtlrayError("raw data broken")

    recipe = Recipe("builtin", {"dataset": "tiny"}, seed=0)
    with pytest.raises(DtlrayError, match="raw data broken"):
        prepare_dataset("tiny", tmp_path, recipe, load)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_rebuild_keeps_the_old_dataset(tmp_path: Path) -> None:
    old = prepare_builtin("faces", tmp_path)

    def load() -> SourceImages:
        raise DtlrayError("raw data broken")

    recipe = Recipe("builtin", {"dataset": "faces", "limit": None}, seed=9)
    with pytest.raises(DtlrayError, match="raw data broken"):
        prepare_dataset("faces", tmp_path, recipe, load, force=True)
    assert load_info("faces", tmp_path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["faces"]


def test_losing_a_race_reuses_the_winners_dataset(tmp_path: Path) -> None:
    recipe = Recipe("builtin", {"dataset": "tiny"}, seed=0)
    winner: list[DatasetInfo] = []

    def load_while_another_process_wins() -> SourceImages:
        # the other process finishes its whole prepare while this one is still building
        winner.append(prepare_dataset("tiny", tmp_path, recipe, _tiny_source).info)
        return _tiny_source()

    result = prepare_dataset("tiny", tmp_path, recipe, load_while_another_process_wins)
    assert result.reused
    assert result.info == winner[0] == load_info("tiny", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_losing_a_race_to_other_arguments_says_so(tmp_path: Path) -> None:
    def load_while_another_process_wins() -> SourceImages:
        other = Recipe("builtin", {"dataset": "tiny"}, seed=1)
        prepare_dataset("tiny", tmp_path, other, _tiny_source)
        return _tiny_source()

    recipe = Recipe("builtin", {"dataset": "tiny"}, seed=0)
    with pytest.raises(DtlrayError, match="other arguments.*seed=1.*seed=0.*--force"):
        prepare_dataset("tiny", tmp_path, recipe, load_while_another_process_wins)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_two_processes_prepare_the_same_dataset(tmp_path: Path) -> None:
    code = (
        "import sys; from dtlray.data import prepare_builtin; "
        "print(prepare_builtin('fashion-mnist', sys.argv[1], limit=2000).fingerprint)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    fingerprints = {stdout.strip() for stdout, _ in outputs}
    info = load_info("fashion-mnist", tmp_path)
    assert fingerprints == {info.fingerprint}
    for split in SPLITS:
        validate_split(info, split)
    assert [p.name for p in tmp_path.iterdir()] == ["fashion-mnist"]


def test_stale_temp_dir_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in ".-")
    stale = tmp_path / f".digits.tmp-{dead.pid}@{host}-abcd1234"
    (stale / "train").mkdir(parents=True)
    alive = tmp_path / f".digits.tmp-{os.getpid()}@{host}-abcd1234"
    alive.mkdir()
    prepare_builtin("digits", tmp_path, limit=20)
    assert not stale.exists()
    assert alive.exists()  # still owned by a running process: left alone


def test_unknown_builtin_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DtlrayError, match="unknown dataset 'mnist'.*fashion-mnist, digits, faces"):
        prepare_builtin("mnist", tmp_path)


def test_missing_fashion_mnist_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DtlrayError) as err:
        prepare_builtin("fashion-mnist", tmp_path / "root", source_dir=tmp_path / "empty")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--from DIR" in message and "--download" in message
    assert not (tmp_path / "root").exists()


def test_fashion_mnist_from_another_folder(tmp_path: Path) -> None:
    source = tmp_path / "raw"
    source.mkdir()
    for path in FASHION_MNIST_DIR.glob("*-ubyte.gz"):
        (source / path.name).symlink_to(path)
    info = prepare_builtin("fashion-mnist", tmp_path / "root", source_dir=source, limit=100)
    assert info.splits == {"train": 100, "val": 100, "test": 100}
    assert str(source) in info.provenance.source


def test_corrupt_fashion_mnist_file_is_named(tmp_path: Path) -> None:
    source = tmp_path / "raw"
    source.mkdir()
    for path in FASHION_MNIST_DIR.glob("*-ubyte.gz"):
        (source / path.name).symlink_to(path)
    broken = source / "t10k-labels-idx1-ubyte.gz"
    broken.unlink()
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DtlrayError, match=r"t10k-labels-idx1-ubyte\.gz.*--from DIR"):
        prepare_builtin("fashion-mnist", tmp_path / "root", source_dir=source, limit=10)
    assert [p.name for p in (tmp_path / "root").iterdir()] == []


def test_from_and_download_apply_to_fashion_mnist_only(tmp_path: Path) -> None:
    with pytest.raises(DtlrayError, match="only to fashion-mnist"):
        prepare_builtin("digits", tmp_path, source_dir=tmp_path)


def test_unwritable_root_fails_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DtlrayError, match="not writable.*--root DIR.*DTLRAY_DATA"):
        prepare_builtin("digits", blocker / "root")


def test_force_will_not_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "holiday.jpg").write_bytes(b"")
    with pytest.raises(DtlrayError, match="not a dtlray dataset"):
        prepare_builtin("digits", tmp_path, force=True)
    with pytest.raises(DtlrayError, match="no dataset.json"):
        prepare_builtin("digits", tmp_path)
    assert (tmp_path / "digits" / "holiday.jpg").exists()


def test_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "faces").write_text("")
    for force in (False, True):
        with pytest.raises(DtlrayError, match="exists and is not a (directory|dtlray dataset)"):
            prepare_builtin("faces", tmp_path, force=force)


def test_shards_split_large_splits(tmp_path: Path) -> None:
    info = prepare_builtin("fashion-mnist", tmp_path, limit=25_000)
    assert [len(info.files[split]) for split in SPLITS] == [3, 1, 1]
    assert [shard.rows for shard in info.files["train"]] == [8334, 8333, 8333]
    assert [Path(p).name for p in info.split_files("train")] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
