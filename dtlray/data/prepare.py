"""Raw images -> stratified splits -> Parquet shards -> an atomically published dataset directory.

The builders (:mod:`dtlray.data.builtins`, :mod:`dtlray.data.folder`) turn their raw data into a
:class:`SourceImages` (all images in memory as one uint8 array) and a :class:`Recipe` (the
arguments that decide the content). :func:`prepare_dataset` does the rest:

1. If ``<root>/<name>`` exists with the same recipe, reuse it; with another recipe, refuse unless
   ``force``.
2. Build the whole dataset in a hidden temp directory beside the target (same filesystem):
   split, write every shard (fsynced), then ``dataset.json`` last.
3. ``os.rename`` the temp directory into place. A rename is atomic, so readers see either no
   dataset or a whole one; a crash leaves only a hidden ``.<name>.tmp-*`` directory, which the next
   prepare on this host removes once its process is gone. When two processes race, the first
   rename wins and the other one reuses the winner's dataset.

On object storage (a URI root) there is no rename: the shards are written in place and
``dataset.json`` last, in one PUT that the store makes visible only when complete, so it is the
commit. A crash leaves shards without ``dataset.json``, which no reader takes for a dataset and
the next prepare clears; ``--force`` first withdraws the old ``dataset.json``. Two prepares of one
dataset on object storage at the same time are not supported: one may clear the other's
shards, which the next read reports as missing (run the prepare again with ``--force``).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtlray.data.codec import check_image_format, encode_images
from dtlray.data.layout import (
    INFO_FILE,
    SPLITS,
    DatasetInfo,
    Provenance,
    ShardInfo,
    compute_fingerprint,
    read_info,
    resolve_root,
    validate_name,
)
from dtlray.errors import DtlrayError
from dtlray.storage import check_location, filesystem, is_uri, join, list_files, storage_error

logger = logging.getLogger(__name__)

ROWS_PER_SHARD = 10_000
"""Target rows per part file; a split gets ``ceil(rows / ROWS_PER_SHARD)`` equal shards."""

MAX_SHARD_BYTES = 256 * 2**20
"""Upper bound on raw image bytes per part file (keeps large-image shards readable in one go)."""

PARQUET_COMPRESSION = "zstd"

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9.-]*)-\w+$")


@dataclass(frozen=True)
class Recipe:
    """What decides a dataset's content; equal recipes give byte-identical datasets.

    Attributes:
        builder: ``"builtin"`` or ``"image-folder"``.
        arguments: JSON-able arguments that change the content (e.g. ``limit``, ``image_size``).
        seed: Seed of the splits.
        versions: Distributions whose versions are recorded with the dataset.
        image_format: How the image rows are stored (:data:`dtlray.data.codec.IMAGE_FORMATS`).
    """

    builder: str
    arguments: dict[str, Any]
    seed: int
    versions: tuple[str, ...] = ()
    image_format: str = "raw"

    def __post_init__(self) -> None:
        check_image_format(self.image_format)

    @property
    def recorded_arguments(self) -> dict[str, Any]:
        """The arguments as the provenance records them: with ``image_format`` unless ``raw``
        (so datasets prepared before formats existed still match their recipe)."""
        if self.image_format == "raw":
            return self.arguments
        return {**self.arguments, "image_format": self.image_format}

    def matches(self, provenance: Provenance) -> bool:
        """Whether a dataset made as ``provenance`` says has this recipe's content."""
        return (provenance.builder, provenance.arguments, provenance.seed) == (
            self.builder,
            self.recorded_arguments,
            self.seed,
        )

    def describe(self) -> str:
        """The arguments as ``key=value`` text, for messages."""
        return describe_arguments(self.recorded_arguments, self.seed)

    def provenance(self, source: str) -> Provenance:
        """The provenance to record for a dataset built from ``source`` now."""
        versions = {"dtlray": _version("dtlray"), "python": platform.python_version()}
        for dist in ("numpy", "pyarrow", "scikit-learn", *self.versions):
            versions[dist] = _version(dist)
        return Provenance(
            builder=self.builder,
            arguments=self.recorded_arguments,
            seed=self.seed,
            source=source,
            versions=versions,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )


@dataclass(frozen=True)
class SourceImages:
    """Raw data of a dataset, decoded to its stored shape.

    Attributes:
        classes: Class names; label ``i`` is ``classes[i]``.
        images: ``(N, H, W, C)`` uint8 array.
        labels: ``(N,)`` int64 array with values in ``[0, len(classes))``.
        source: Where the data came from, for the provenance record.
        test_indices: Rows that form the official test split (Fashion-MNIST); None to carve a
            stratified test split.
        val_fraction: Fraction of the non-test rows that become the val split when
            ``test_indices`` is given; otherwise fraction of all rows.
        test_fraction: Fraction of all rows that become the test split (no ``test_indices``).
    """

    classes: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    source: str
    test_indices: np.ndarray | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)
        assert len(self.labels) == 0 or 0 <= self.labels.min() <= self.labels.max() < len(
            self.classes
        ), "labels outside [0, num_classes)"


@dataclass(frozen=True)
class Prepared:
    """Result of :func:`prepare_dataset`: the dataset and whether an existing one was reused."""

    info: DatasetInfo
    reused: bool


def prepare_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    recipe: Recipe,
    load: Callable[[], SourceImages],
    *,
    force: bool = False,
    limit: int | None = None,
) -> Prepared:
    """Build dataset ``name`` under ``root`` from ``load()``, or reuse it if already built.

    Args:
        name: Dataset name (directory under the root).
        root: Data root (see :func:`dtlray.data.resolve_root`).
        recipe: The content-deciding arguments, compared with an existing dataset's.
        load: Returns the raw images; called only when a build is needed.
        force: Rebuild even if a dataset with other arguments exists.
        limit: Keep at most this many rows per split (a stratified subset), for tests.

    Returns:
        The prepared dataset and whether it was reused.

    Raises:
        DtlrayError: The existing dataset was made with other arguments (and not ``force``), the
            target is not a dtlray dataset, the root is not writable, or ``load`` failed.
    """
    validate_name(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DtlrayError(f"--limit must be a positive number of rows per split, got {limit!r}")
    resolved = resolve_root(root)
    if is_uri(resolved):
        return _prepare_in_store(name, resolved, recipe, load, force=force, limit=limit)
    root_path = Path(resolved)
    target = root_path / name
    if not force:
        existing = _existing_dataset(target)
        if existing is not None:
            return Prepared(_reuse(existing, recipe), reused=True)
    elif target.exists() and not (
        target.is_dir() and ((target / INFO_FILE).is_file() or not any(target.iterdir()))
    ):
        raise DtlrayError(
            f"{target} exists and is not a dtlray dataset, so --force will not replace it: "
            "move it away or choose another --name/--root"
        )

    tmp = _make_temp_dir(root_path, name, "tmp")
    try:
        _remove_stale_temp_dirs(root_path, name, keep=tmp)
        source = load()
        info = _write_dataset(_LocalSink(tmp), name, source, recipe, limit=limit, path=str(tmp))
        published = _publish(tmp, target, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if published:
        logger.debug(  # the shard lines showed the progress; callers report the result
            "%s: prepared %s rows (%s) in %s",
            name,
            f"{info.num_rows:,}",
            _rows_text(info),
            target,
        )
        return Prepared(read_info(str(target)), reused=False)
    logger.info("%s: another process prepared it at the same time", name)
    existing = _existing_dataset(target)
    if existing is None:  # the winner's dataset vanished again (a concurrent --force)
        raise DtlrayError(f"{target} changed while it was being prepared: run the command again")
    return Prepared(_reuse(existing, recipe), reused=True)


def _prepare_in_store(
    name: str,
    root: str,
    recipe: Recipe,
    load: Callable[[], SourceImages],
    *,
    force: bool,
    limit: int | None,
) -> Prepared:
    """:func:`prepare_dataset` on object storage: shards in place, ``dataset.json`` last."""
    check_location(root)
    target = join(root, name)
    fs, inner = filesystem(target)
    try:
        existing: DatasetInfo | None = read_info(target)
        described = True
    except FileNotFoundError:
        existing, described = None, False
    except DtlrayError:  # an invalid dataset.json: what --force is for
        if not force:
            raise
        existing, described = None, True
    if existing is not None and not force:
        return Prepared(_reuse(existing, recipe), reused=True)
    entries = list_files(target)
    foreign = [join(target, relative) for relative in entries if not _is_dataset_file(relative)]
    if foreign:
        raise DtlrayError(
            f"{target} holds files that are not a dtlray dataset's (e.g. {foreign[0]}), so "
            "prepare will not write there: move them away or choose another --name/--root"
        )
    try:
        if described:  # --force: withdraw the old dataset before changing its shards
            fs.delete_file(f"{inner}/{INFO_FILE}")
        if entries:
            logger.info(
                "%s: clearing %d files of an unfinished or replaced prepare", name, len(entries)
            )
            fs.delete_dir_contents(inner, missing_dir_ok=True)
    except OSError as err:
        raise storage_error(target, err) from None
    source = load()  # outside the try: a loader's OSError is no object-store error
    try:
        _write_dataset(_StoreSink(fs, inner), name, source, recipe, limit=limit, path=target)
    except OSError as err:
        raise storage_error(target, err) from None
    return Prepared(read_info(target), reused=False)


def _is_dataset_file(relative: str) -> bool:
    """Whether ``relative`` (inside a dataset directory) is a file a prepare writes."""
    parts = relative.split("/")
    if parts == [INFO_FILE]:
        return True
    return (
        len(parts) == 2
        and parts[0] in SPLITS
        and parts[1].startswith("part-")
        and parts[1].endswith(".parquet")
    )


class _LocalSink:
    """Writes a dataset's files into a local directory, each fsynced, then the directories."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, relative: str, payload: bytes | pa.Buffer) -> None:
        path = self.directory / relative
        path.parent.mkdir(exist_ok=True)
        _write_synced(path, payload)

    def finish(self) -> None:
        for synced in (*(self.directory / split for split in SPLITS), self.directory):
            _fsync_dir(synced)


class _StoreSink:
    """Writes a dataset's files to object storage, one PUT (or multipart upload) each."""

    def __init__(self, fs: pafs.FileSystem, directory: str) -> None:
        self.fs, self.directory = fs, directory

    def write(self, relative: str, payload: bytes | pa.Buffer) -> None:
        with self.fs.open_output_stream(f"{self.directory}/{relative}") as handle:
            handle.write(memoryview(payload))

    def finish(self) -> None:
        """Nothing: an object is durable once its upload returns."""


def _existing_dataset(target: Path) -> DatasetInfo | None:
    """The local dataset at ``target``; None when there is none yet."""
    if not target.exists():
        return None
    if not target.is_dir():
        raise DtlrayError(
            f"{target} exists and is not a directory: move it away or choose another --name/--root"
        )
    try:
        return read_info(str(target))
    except FileNotFoundError:
        if target.is_dir() and not any(target.iterdir()):
            return None  # an empty directory is no dataset; the rename replaces it
        raise DtlrayError(
            f"{target} exists but has no {INFO_FILE}, so it is not a dtlray dataset: move it "
            "away or choose another --name/--root"
        ) from None


def _reuse(existing: DatasetInfo, recipe: Recipe) -> DatasetInfo:
    from dtlray.data.read import validate_split

    if not recipe.matches(existing.provenance):
        old = existing.provenance
        elsewhere = "--root" if recipe.builder == "builtin" else "--name or --root"
        raise DtlrayError(
            f"dataset {existing.name!r} in {existing.root} was prepared with other "
            f"arguments ({describe_arguments(old.arguments, old.seed)}) than now "
            f"({recipe.describe()}): pass --force to rebuild it, or use another {elsewhere}"
        )
    for split in SPLITS:
        validate_split(existing, split, footers=True, check_hashes=False)
    logger.info(
        "%s: reusing the existing dataset in %s (same arguments; --force rebuilds it)",
        existing.name,
        existing.path,
    )
    return existing


def _make_temp_dir(root: Path, name: str, kind: str) -> Path:
    """A hidden directory beside the target, named so that a later run can tell who owns it."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}@{host}-", dir=root))
    except OSError as err:
        raise DtlrayError(
            f"data root {root} is not writable ({err.strerror or err}): pass --root DIR or set "
            "$DTLRAY_DATA to a writable directory"
        ) from err
    path.chmod(0o755)  # mkdtemp makes it 0700; the published dataset should be readable by others
    return path


def _remove_stale_temp_dirs(root: Path, name: str, keep: Path) -> None:
    """Remove temp dirs of ``name`` left by crashed processes on this host."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())
    for entry in root.glob(f".{name}.*-*@*-*"):
        match = _TEMP_RE.match(entry.name)
        if entry == keep or not match or match["name"] != name or match["host"] != host:
            continue
        if not _process_alive(int(match["pid"])):
            logger.info("%s: removing %s left by a stopped process", name, entry)
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def split_indices(source: SourceImages, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test row indices of ``source``.

    Args:
        source: The raw data with its split fractions (or official test rows).
        seed: ``random_state`` of the stratified shuffles.

    Returns:
        Row indices per split, each in shuffled order.

    Raises:
        DtlrayError: A class has too few rows for stratified splits.
    """
    from sklearn.model_selection import train_test_split

    labels = source.labels
    everything = np.arange(len(labels))
    try:
        if source.test_indices is None:
            n_test = max(1, round(source.test_fraction * len(labels)))
            n_val = max(1, round(source.val_fraction * len(labels)))
            pool, test = train_test_split(
                everything, test_size=n_test, stratify=labels, random_state=seed
            )
        else:
            test = np.asarray(source.test_indices)
            pool = np.setdiff1d(everything, test)
            n_val = max(1, round(source.val_fraction * len(pool)))
        train, val = train_test_split(
            pool, test_size=n_val, stratify=labels[pool], random_state=seed
        )
    except ValueError as err:  # sklearn: "The least populated class in y has only 1 member..."
        counts = np.bincount(labels, minlength=len(source.classes))
        smallest = int(counts.argmin())
        raise DtlrayError(
            f"cannot make stratified train/val/test splits of {source.source}: class "
            f"{source.classes[smallest]!r} has {counts[smallest]} images of {len(labels)} ({err}); "
            "add images so that every class has at least ~10"
        ) from err
    return {"train": train, "val": val, "test": test}


def limit_indices(indices: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """A stratified, seeded subset of at most ``limit`` of ``indices``."""
    from sklearn.model_selection import train_test_split

    if len(indices) <= limit:
        return indices
    if limit < len(np.unique(labels[indices])):
        return indices[:limit]  # too few rows to hold every class; indices are already shuffled
    subset, _ = train_test_split(
        indices, train_size=limit, stratify=labels[indices], random_state=seed
    )
    return subset


class _Sink(Protocol):
    def write(self, relative: str, payload: bytes | pa.Buffer) -> None: ...

    def finish(self) -> None: ...


def _write_dataset(
    sink: _Sink,
    name: str,
    source: SourceImages,
    recipe: Recipe,
    *,
    limit: int | None,
    path: str,
) -> DatasetInfo:
    """Split ``source``, write its shards through ``sink``, then ``dataset.json`` last.

    ``path`` is where the written dataset is (the returned info's ``path``)."""
    image_shape = tuple(int(d) for d in source.images.shape[1:])
    indices = split_indices(source, recipe.seed)
    if limit is not None:
        indices = {
            split: limit_indices(rows, source.labels, limit, recipe.seed)
            for split, rows in indices.items()
        }
    files: dict[str, tuple[ShardInfo, ...]] = {}
    for split in SPLITS:
        files[split] = write_split(
            sink,
            split,
            source.images[indices[split]],
            source.labels[indices[split]],
            name,
            image_format=recipe.image_format,
        )
    info = DatasetInfo(
        name=name,
        classes=source.classes,
        image_shape=image_shape,  # type: ignore[arg-type]
        image_format=recipe.image_format,  # type: ignore[arg-type]
        splits={split: sum(shard.rows for shard in files[split]) for split in SPLITS},
        files=files,
        fingerprint=compute_fingerprint(
            source.classes,
            image_shape,  # type: ignore[arg-type]
            files,
            recipe.image_format,
        ),
        provenance=recipe.provenance(source.source),
        path=path,
    )
    sink.write(INFO_FILE, info.to_json().encode())
    sink.finish()
    return info


def write_split(
    sink: _Sink,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    name: str = "",
    *,
    image_format: str = "raw",
) -> tuple[ShardInfo, ...]:
    """Write one split as equal-sized Parquet shards ``<split>/part-NNNNN.parquet``.

    Args:
        sink: Where the dataset being built is written.
        split: Split name (sub-directory).
        images: ``(N, H, W, C)`` uint8 images.
        labels: ``(N,)`` integer labels.
        name: Dataset name, for progress messages.
        image_format: How the rows are stored (raw pixels, PNG or JPEG; see
            :func:`parquet_compression`).

    Returns:
        The written shards, in order.
    """
    row_bytes = int(np.prod(images.shape[1:]))
    rows_per_shard = max(1, min(ROWS_PER_SHARD, MAX_SHARD_BYTES // max(row_bytes, 1)))
    num_shards = max(1, math.ceil(len(images) / rows_per_shard))
    shards = []
    for number, rows in enumerate(np.array_split(np.arange(len(images)), num_shards)):
        relative = f"{split}/part-{number:05d}.parquet"
        table = images_to_table(images[rows], labels[rows], image_format)
        buffer = pa.BufferOutputStream()
        pq.write_table(
            table,
            buffer,
            compression=parquet_compression(image_format),
            write_statistics=["label"],  # min/max labels let readers check the range cheaply
        )
        payload = buffer.getvalue()
        sink.write(relative, payload)
        shards.append(
            ShardInfo(
                file=relative,
                rows=len(rows),
                bytes=payload.size,
                sha256=hashlib.sha256(memoryview(payload)).hexdigest(),
            )
        )
        logger.info(
            "%s: %s shard %d/%d: %s rows", name, split, number + 1, num_shards, f"{len(rows):,}"
        )
    return tuple(shards)


def parquet_compression(image_format: str) -> str | dict[str, str]:
    """Parquet compression of a shard: zstd, but none for encoded image rows (zstd cannot
    shrink PNG or JPEG files; it would only cost time on every read)."""
    if image_format == "raw":
        return PARQUET_COMPRESSION
    return {"image": "none", "label": PARQUET_COMPRESSION}


def images_to_table(images: np.ndarray, labels: np.ndarray, image_format: str = "raw") -> pa.Table:
    """An Arrow table with ``image`` (binary, one row per image) and ``label`` (int64).

    Args:
        images: ``(N, H, W, C)`` uint8 images.
        labels: ``(N,)`` integer labels.
        image_format: ``raw`` (each row the image's uint8 bytes, built from one buffer with no
            Python object per row), ``png`` or ``jpeg``.

    Returns:
        The table.
    """
    image_array = encode_images(np.ascontiguousarray(images, dtype=np.uint8), image_format)
    if pa.types.is_large_binary(image_array.type):
        raise AssertionError("shard too large for 32-bit binary offsets")
    return pa.table({"image": image_array, "label": pa.array(labels, type=pa.int64())})


def _write_synced(path: Path, payload: bytes | pa.Buffer) -> None:
    with open(path, "wb") as handle:
        handle.write(memoryview(payload))
        handle.flush()
        os.fsync(handle.fileno())


def _publish(tmp: Path, target: Path, *, force: bool) -> bool:
    """Rename ``tmp`` to ``target``; False when another process's dataset is already there."""
    aside = None
    if force and target.exists():
        aside = _make_temp_dir(target.parent, target.name, "old")
        try:
            os.rename(target, aside)  # replaces the empty ``aside`` directory
        except FileNotFoundError:  # a concurrent --force moved it first
            aside.rmdir()
            aside = None
    try:
        os.rename(tmp, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rows_text(info: DatasetInfo) -> str:
    return ", ".join(f"{split} {rows:,}" for split, rows in info.splits.items())


def describe_arguments(arguments: dict[str, Any], seed: int) -> str:
    """Content-deciding arguments as ``key=value`` text, for messages."""
    return ", ".join(f"{key}={value!r}" for key, value in {**arguments, "seed": seed}.items())


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
