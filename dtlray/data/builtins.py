"""The built-in datasets: name -> loader, all from data installed on this machine.

- ``fashion-mnist``: 70,000 28x28x1, the IDX files of the Debian package
  ``dataset-fashion-mnist`` (official 10k test split; a stratified 10% of train becomes val).
- ``digits``: 1,797 8x8x1, ``sklearn.datasets.load_digits`` (values 0..16, scaled to 0..255).
- ``faces``: 200 25x25x1, ``skimage.data.lfw_subset`` (floats 0..1, scaled to 0..255).

Every built-in keeps its native resolution; models resize at read time
(:func:`dtlray.data.to_model_input`).
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtlray.data.layout import BUILTIN_DATASETS, DEFAULT_ROOT, DatasetInfo, resolve_root
from dtlray.data.prepare import Prepared, Recipe, SourceImages, prepare_dataset
from dtlray.errors import DtlrayError
from dtlray.storage import is_uri

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The official Fashion-MNIST class names, label order."""

FASHION_MNIST_VAL_FRACTION = 0.1
"""Share of the official 60k train rows carved out (stratified) as the val split."""

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DOWNLOAD_DIR = ".downloads"  # under the data root; hidden, so `data list` skips it


@dataclass(frozen=True)
class _Builtin:
    load: Callable[[Path | None, Path], SourceImages]  # (raw data dir or None, data root)
    versions: tuple[str, ...] = ()


def build_builtin(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    seed: int = 0,
    limit: int | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_format: str = "raw",
) -> Prepared:
    """Like :func:`prepare_builtin`, but also says whether an existing dataset was reused."""
    if name not in BUILTIN_DATASETS:
        raise DtlrayError(
            f"unknown dataset {name!r}: the built-in datasets are {', '.join(BUILTIN_DATASETS)}; "
            "for your own images use --image-folder DIR --name NAME"
        )
    if name != "fashion-mnist" and (source_dir is not None or download):
        raise DtlrayError(
            f"--from and --download apply only to fashion-mnist; {name!r} ships with "
            f"{'scikit-learn' if name == 'digits' else 'scikit-image'}: drop them"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DtlrayError(f"--seed must be a non-negative integer, got {seed!r}")
    builtin = _BUILTINS[name]
    resolved = resolve_root(root)
    # Raw downloads stay on this machine: under a local root, or beside the default one.
    root_path = Path(resolve_root(DEFAULT_ROOT) if is_uri(resolved) else resolved)
    located: Path | None = None
    if name == "fashion-mnist":  # fail before any work when the raw files are missing
        located = _locate_fashion_mnist(source_dir, root_path, download=download)
    recipe = Recipe(
        builder="builtin",
        arguments={"dataset": name, "limit": limit},
        seed=seed,
        versions=builtin.versions,
        image_format=image_format,
    )
    return prepare_dataset(
        name, resolved, recipe, lambda: builtin.load(located, root_path), force=force, limit=limit
    )


def prepare_builtin(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    seed: int = 0,
    limit: int | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_format: str = "raw",
) -> DatasetInfo:
    """Prepare a built-in dataset (``fashion-mnist``, ``digits``, ``faces``) under the data root.

    Idempotent: if the dataset exists with the same arguments it is reused as it is.

    Args:
        name: One of :data:`BUILTIN_DATASETS`.
        root: Data root (see :func:`dtlray.data.resolve_root`).
        force: Rebuild even when a dataset with other arguments exists.
        seed: Seed of the stratified splits.
        limit: Keep at most this many rows per split (a stratified subset), for tests.
        source_dir: Fashion-MNIST only: a directory with the four IDX files (``.gz`` or not)
            instead of ``/usr/share/datasets/fashion-mnist``.
        download: Fashion-MNIST only: if the files are not found, download them with
            torchvision (needs internet) into ``<root>/.downloads``.
        image_format: How the images are stored: ``raw`` (the default: the built-ins are tiny
            images, whose raw rows cost less to read than to decode), ``png`` or ``jpeg``.

    Returns:
        The prepared dataset.

    Raises:
        DtlrayError: Unknown name, raw data missing or unreadable, the dataset exists with other
            arguments (and not ``force``), or the root is not writable.
    """
    return build_builtin(
        name,
        root,
        force=force,
        seed=seed,
        limit=limit,
        source_dir=source_dir,
        download=download,
        image_format=image_format,
    ).info


# --- Fashion-MNIST -------------------------------------------------------------------------------


def _fashion_files_in(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (gzipped or not), or None if any is missing."""
    found = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _locate_fashion_mnist(
    source_dir: str | os.PathLike[str] | None, root: Path, *, download: bool
) -> Path | None:
    """The directory holding the IDX files; None means "download them when building"."""
    if source_dir is not None:
        candidates = [Path(source_dir).expanduser()]
    else:
        candidates = [FASHION_MNIST_DIR, root / _DOWNLOAD_DIR / "FashionMNIST" / "raw"]
    for directory in candidates:
        if _fashion_files_in(directory) is not None:
            return directory
    if download and source_dir is None:
        return None
    names = ", ".join(f"{stem}.gz" for stem in _FASHION_FILES.values())
    raise DtlrayError(
        f"Fashion-MNIST files not found in {candidates[0]} (need {names}): install them with "
        "`apt-get install dataset-fashion-mnist`, pass --from DIR for a folder that holds them, "
        "or add --download to fetch them with torchvision (needs internet)"
    )


def _download_fashion_mnist(root: Path) -> Path:
    """Download the IDX files with torchvision into ``<root>/.downloads``; return their folder."""
    from torchvision.datasets import FashionMNIST

    destination = root / _DOWNLOAD_DIR
    logger.info("fashion-mnist: downloading with torchvision into %s", destination)
    try:
        for train in (True, False):
            FashionMNIST(str(destination), train=train, download=True)
    except (RuntimeError, OSError) as err:  # torchvision wraps URLError in RuntimeError
        raise DtlrayError(
            f"could not download Fashion-MNIST ({err}): check the internet connection, or install "
            "the files with `apt-get install dataset-fashion-mnist`"
        ) from err
    return destination / "FashionMNIST" / "raw"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes, as in the MNIST distribution.

    Args:
        path: The file.

    Returns:
        A uint8 array with the dimensions given in the file's header.

    Raises:
        DtlrayError: The file is unreadable, truncated or not a uint8 IDX file.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes (bad magic number)")
        ndim = data[3]
        header = 4 + 4 * ndim
        dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        if len(data) != header + int(np.prod(dims)):
            raise ValueError(f"{len(data) - header} bytes of data for dimensions {dims}")
        return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DtlrayError(
            f"cannot read Fashion-MNIST file {path} ({err}): reinstall "
            "`dataset-fashion-mnist`, or pass --from DIR with intact files"
        ) from err


def _load_fashion_mnist(directory: Path | None, root: Path) -> SourceImages:
    if directory is None:  # not installed and --download given
        directory = _download_fashion_mnist(root)
    files = _fashion_files_in(directory)
    if files is None:
        raise DtlrayError(f"Fashion-MNIST files disappeared from {directory}: run again")
    arrays = {key: read_idx(path) for key, path in files.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.shape != (len(images),) or labels.max(initial=0) > 9:
            raise DtlrayError(
                f"Fashion-MNIST {part} files in {directory} do not match (images {images.shape}, "
                f"labels {labels.shape}): reinstall `dataset-fashion-mnist` or pass --from DIR"
            )
    num_train = len(arrays["train_images"])
    images = np.concatenate([arrays["train_images"], arrays["test_images"]])[..., np.newaxis]
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
    logger.info("fashion-mnist: read %s images from %s", f"{len(images):,}", directory)
    return SourceImages(
        classes=FASHION_MNIST_CLASSES,
        images=images,
        labels=labels,
        source=f"Fashion-MNIST IDX files in {directory}",
        test_indices=np.arange(num_train, len(images)),  # the official 10k test split
        val_fraction=FASHION_MNIST_VAL_FRACTION,
    )


# --- digits and faces ----------------------------------------------------------------------------


def _load_digits(_source_dir: Path | None, _root: Path) -> SourceImages:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images of 4x4-pixel counts, 0..16; scale to the full uint8 range
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., np.newaxis]
    return SourceImages(
        classes=tuple(str(name) for name in digits.target_names),
        images=images,
        labels=digits.target.astype(np.int64),
        source="sklearn.datasets.load_digits()",
    )


def _load_faces(_source_dir: Path | None, _root: Path) -> SourceImages:
    from skimage.data import lfw_subset

    faces = lfw_subset()  # (200, 25, 25): the first 100 are faces, the other 100 are not
    if faces.shape[0] != 200:
        raise AssertionError(f"skimage lfw_subset changed: shape {faces.shape}")
    if faces.dtype != np.uint8:  # floats in 0..1 in scikit-image 0.2x
        faces = np.rint(np.clip(faces, 0.0, 1.0) * 255.0).astype(np.uint8)
    return SourceImages(
        classes=("face", "not_face"),
        images=faces[..., np.newaxis],
        labels=(np.arange(len(faces)) >= 100).astype(np.int64),
        source="skimage.data.lfw_subset()",
    )


_BUILTINS: dict[str, _Builtin] = {
    "fashion-mnist": _Builtin(load=_load_fashion_mnist),
    "digits": _Builtin(load=_load_digits),
    "faces": _Builtin(load=_load_faces, versions=("scikit-image",)),
}
assert set(_BUILTINS) == set(BUILTIN_DATASETS)
