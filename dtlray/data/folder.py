"""A user's folder of class sub-folders -> a prepared dataset.

``DIR/<class>/*.png|*.jpg|*.jpeg``, as torchvision's ``ImageFolder`` reads it: classes are the
sub-folder names, sorted. Every image is decoded with Pillow, turned upright (EXIF), converted to
grey (``L``) or ``RGB`` and fitted to ``image_size`` x ``image_size`` (scaled so the shorter side
fits, then centre-cropped), so all rows share one stored shape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dtlray.data.layout import DatasetInfo, validate_name
from dtlray.data.prepare import Prepared, Recipe, SourceImages, prepare_dataset
from dtlray.errors import DtlrayError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
CHANNELS: tuple[int, ...] = (1, 3)

ENCODE_FROM_SIZE = 96
"""An image folder stored at this size or larger defaults to JPEG, a smaller one to raw pixels.

At 96 px and up a photo's raw pixels are several times its JPEG (about 10x at 224 px; see
``bench/ingest.py``), so storage, the network and the reads pay for raw rows, and Ray Data's CPUs
decode JPEG far faster than a GPU trains on it. Below, a raw row is a few KB that zstd already
compresses, and decoding would cost more CPU than the bytes it saves.
"""


def default_image_format(image_size: int) -> str:
    """The stored format of an image folder prepared at ``image_size`` without --image-format."""
    return "jpeg" if image_size >= ENCODE_FROM_SIZE else "raw"


def build_image_folder(
    folder: str | os.PathLike[str],
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 32,
    channels: int = 3,
    force: bool = False,
    seed: int = 0,
    skip_bad: bool = False,
    image_format: str | None = None,
) -> Prepared:
    """Like :func:`prepare_image_folder`, but also says whether an existing dataset was reused."""
    validate_name(name)
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not (MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE)
    ):
        raise DtlrayError(
            f"--image-size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
            f"got {image_size!r}: e.g. --image-size 32"
        )
    if channels not in CHANNELS or isinstance(channels, bool):
        raise DtlrayError(f"--channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DtlrayError(f"--seed must be a non-negative integer, got {seed!r}")
    directory = Path(os.path.abspath(Path(folder).expanduser()))
    classes, files, labels = scan_image_folder(directory)
    recipe = Recipe(
        builder="image-folder",
        arguments={
            "image_folder": str(directory),
            "image_size": image_size,
            "channels": channels,
            "skip_bad": skip_bad,
        },
        seed=seed,
        versions=("pillow",),
        image_format=default_image_format(image_size) if image_format is None else image_format,
    )

    def load() -> SourceImages:
        return _load_folder(
            directory, classes, files, labels, image_size, channels, skip_bad=skip_bad
        )

    return prepare_dataset(name, root, recipe, load, force=force)


def prepare_image_folder(
    folder: str | os.PathLike[str],
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 32,
    channels: int = 3,
    force: bool = False,
    seed: int = 0,
    skip_bad: bool = False,
    image_format: str | None = None,
) -> DatasetInfo:
    """Prepare a dataset from a folder of class sub-folders of PNG/JPEG images.

    Idempotent: if the dataset exists with the same arguments it is reused as it is.

    Args:
        folder: ``DIR`` with one sub-folder of images per class.
        name: Dataset name (its directory under the root).
        root: Data root (see :func:`dtlray.data.resolve_root`).
        image_size: Stored height and width, 8..512.
        channels: Stored channels: 1 (grey) or 3 (RGB).
        force: Rebuild even when a dataset with other arguments exists.
        seed: Seed of the stratified 70/15/15 train/val/test splits.
        skip_bad: Skip unreadable images (and report how many) instead of failing.
        image_format: ``raw``, ``png`` or ``jpeg``; None: :func:`default_image_format` (JPEG
            from :data:`ENCODE_FROM_SIZE` px, else raw).

    Returns:
        The prepared dataset.

    Raises:
        DtlrayError: Bad name, size or channels; the folder is missing or has fewer than two
            classes, an empty class or an unreadable image (without ``skip_bad``); the dataset
            exists with other arguments (and not ``force``); the root is not writable.
    """
    return build_image_folder(
        folder,
        name,
        root,
        image_size=image_size,
        channels=channels,
        force=force,
        seed=seed,
        skip_bad=skip_bad,
        image_format=image_format,
    ).info


def scan_image_folder(directory: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """List the classes and image files of an image folder, without decoding anything.

    Args:
        directory: The folder of class sub-folders.

    Returns:
        Class names (sorted), image files (sorted per class) and their int64 labels.

    Raises:
        DtlrayError: The folder is missing, has fewer than two class sub-folders, or a class
            sub-folder has no PNG/JPEG image.
    """
    if not directory.is_dir():
        raise DtlrayError(
            f"image folder {directory} does not exist or is not a directory: pass "
            "--image-folder DIR with one sub-folder of images per class"
        )
    class_dirs = sorted(
        entry for entry in directory.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if len(class_dirs) < 2:
        found = ", ".join(repr(d.name) for d in class_dirs) or "none"
        raise DtlrayError(
            f"image folder {directory} needs at least two class sub-folders (found {found}): "
            "put each class's images in its own sub-folder, e.g. DIR/cat/*.png and DIR/dog/*.png"
        )
    files: list[Path] = []
    labels: list[int] = []
    ignored = 0
    for label, class_dir in enumerate(class_dirs):
        candidates = [path for path in _walk_files(class_dir) if not path.name.startswith(".")]
        images = sorted(path for path in candidates if path.suffix.lower() in IMAGE_EXTENSIONS)
        ignored += len(candidates) - len(images)
        if not images:
            raise DtlrayError(
                f"class folder {class_dir} has no PNG or JPEG images: add some, or remove the "
                "folder"
            )
        files.extend(images)
        labels.extend([label] * len(images))
    if ignored:
        logger.info("%s: ignoring %d file(s) that are not PNG or JPEG", directory, ignored)
    logger.info("%s: %d images in %d classes", directory, len(files), len(class_dirs))
    return tuple(d.name for d in class_dirs), files, np.asarray(labels, dtype=np.int64)


def _walk_files(directory: Path) -> Iterator[Path]:
    for parent, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            yield Path(parent) / filename


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode one image to ``(image_size, image_size, channels)`` uint8.

    Palette and alpha images are converted the way torchvision's ``ImageFolder`` loader does
    (``convert("RGB")``, via RGBA for palettes with transparency); grey is ``convert("L")``.

    Raises:
        OSError, ValueError: Pillow cannot read the file (including truncated files and
            decompression bombs).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert("L" if channels == 1 else "RGB")
        image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(image_size, image_size, channels)


def _load_one(path: Path, image_size: int, channels: int) -> np.ndarray | str:
    from PIL import Image

    try:
        return load_image(path, image_size, channels)
    # Pillow raises OSError (UnidentifiedImageError, truncated data), ValueError, SyntaxError
    # ("broken PNG file") or DecompressionBombError for files it cannot decode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _load_folder(
    directory: Path,
    classes: tuple[str, ...],
    files: list[Path],
    labels: np.ndarray,
    image_size: int,
    channels: int,
    *,
    skip_bad: bool,
) -> SourceImages:
    images = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    good = np.ones(len(files), dtype=bool)
    bad: list[tuple[Path, str]] = []
    last_log = time.monotonic()
    # Pillow releases the GIL while decoding and resizing, so threads use every core
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        results = pool.map(lambda p: _load_one(p, image_size, channels), files)
        for index, (path, result) in enumerate(zip(files, results, strict=True)):
            if isinstance(result, str):
                if not skip_bad:
                    raise DtlrayError(
                        f"cannot read image {path} ({result}): fix or remove the file, or pass "
                        "--skip-bad to skip unreadable images"
                    )
                bad.append((path, result))
                good[index] = False
                continue
            images[index] = result
            if time.monotonic() - last_log > 2.0:
                logger.info("decoded %s/%s images", f"{index + 1:,}", f"{len(files):,}")
                last_log = time.monotonic()
    finally:
        pool.shutdown(cancel_futures=True)  # on a bad image, do not decode the rest first
    if bad:
        logger.warning(
            "skipped %d unreadable image(s) of %d, e.g. %s (%s)",
            len(bad),
            len(files),
            bad[0][0],
            bad[0][1],
        )
    kept_labels = labels[good]
    missing = [classes[c] for c in range(len(classes)) if not np.any(kept_labels == c)]
    if missing:
        raise DtlrayError(
            f"every image of class(es) {', '.join(map(repr, missing))} in {directory} is "
            "unreadable: fix the files or remove those class folders"
        )
    skipped = f", {len(bad)} unreadable skipped" if bad else ""
    return SourceImages(
        classes=classes,
        images=images[good],
        labels=kept_labels,
        source=f"image folder {directory} ({int(good.sum())} images{skipped})",
    )
