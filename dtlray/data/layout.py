"""Where prepared datasets live and what ``dataset.json`` says about them.

A prepared dataset is one directory (or object-storage prefix: the root may be a URI such as
``s3://bucket/data``)::

    <root>/<name>/dataset.json             # DatasetInfo, written last
    <root>/<name>/<split>/part-NNNNN.parquet  # columns: image (binary), label (int64)

``image`` rows are stored as ``dataset.json``'s ``image_format`` says: ``raw`` (the H*W*C uint8
pixels), ``png`` or ``jpeg`` (an encoded file each; see :mod:`dtlray.data.codec`).

``dataset.json`` lists every part file with its row count, size and sha256; the fingerprint is a
hash over those (plus the classes and the image shape), so two datasets with the same fingerprint
hold the same bytes, and a reader can check the files against it before reading them.
``dataset.json`` is written last: a directory without it is no dataset (a crashed prepare).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dtlray.errors import DtlrayError
from dtlray.storage import check_location, filesystem, is_uri, join, storage_error

BUILTIN_DATASETS: tuple[str, ...] = ("fashion-mnist", "digits", "faces")
"""Names that ``dtlray data prepare NAME`` builds from data installed on this machine."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Every prepared dataset has these splits, in this order."""

FORMAT_VERSION = 1
"""Version of the on-disk layout; bump it when old datasets can no longer be read."""

INFO_FILE = "dataset.json"
DATA_ENV_VAR = "DTLRAY_DATA"
DEFAULT_ROOT = Path("~/.cache/dtlray/data")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def resolve_root(root: str | os.PathLike[str] | None) -> str:
    """Return the data root: ``root``, else ``$DTLRAY_DATA``, else ``~/.cache/dtlray/data``.

    Args:
        root: An explicit root (``--root``): a directory, or a URI that ``pyarrow.fs``
            understands (``s3://bucket/prefix``), or None.

    Returns:
        The absolute root directory (``~`` expanded), or the URI without a trailing ``/``. It is
        not created here.
    """
    if root is None or str(root) == "":
        root = os.environ.get(DATA_ENV_VAR) or DEFAULT_ROOT
    if is_uri(str(root)):
        return str(root).rstrip("/")
    return os.path.abspath(Path(root).expanduser())


class DatasetNotPrepared(DtlrayError):
    """:func:`load_info` found no ``dataset.json`` for the dataset under the root."""


def validate_name(name: str) -> str:
    """Check that ``name`` can be a dataset directory name and return it.

    Args:
        name: A dataset name such as ``digits`` or ``my-photos``.

    Returns:
        The name, unchanged.

    Raises:
        DtlrayError: The name is empty, hidden, contains a path separator or ``..``, or uses other
            characters than letters, digits, ``.``, ``_`` and ``-``.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise DtlrayError(
            f"invalid dataset name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators, no '..', not hidden), "
            "e.g. --name my-photos"
        )
    return name


class ShardInfo(BaseModel):
    """One Parquet part file of a split, as recorded in ``dataset.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = Field(
        description="path relative to the dataset directory, e.g. train/part-00000.parquet"
    )
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Provenance(BaseModel):
    """How a dataset was made: enough to tell whether a new ``prepare`` asks for the same thing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    builder: str = Field(description="'builtin' or 'image-folder'")
    arguments: dict[str, Any] = Field(description="the arguments that decide the content")
    seed: int
    source: str = Field(description="where the raw data came from, for people")
    versions: dict[str, str] = Field(description="versions of the libraries that wrote it")
    created: str = Field(description="UTC time of writing, ISO 8601")


def compute_fingerprint(
    classes: tuple[str, ...],
    image_shape: tuple[int, int, int],
    files: dict[str, tuple[ShardInfo, ...]],
    image_format: str = "raw",
) -> str:
    """Hash the classes, the image shape, the image format and every part file's path, rows,
    size and sha256.

    Args:
        classes: Class names in label order.
        image_shape: Stored image shape (H, W, C).
        files: Part files per split.
        image_format: How the rows are stored; ``raw`` adds nothing to the hash, so raw datasets
            keep the fingerprints (and stage-1 cache keys) they had before formats existed.

    Returns:
        ``"sha256:<hex>"``; equal for datasets whose files hold the same bytes.
    """
    payload: dict[str, Any] = {
        "classes": list(classes),
        "image_shape": list(image_shape),
        "files": {
            split: [shard.model_dump() for shard in shards]
            for split, shards in sorted(files.items())
        },
    }
    if image_format != "raw":
        payload["image_format"] = image_format
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


class DatasetInfo(BaseModel):
    """A prepared dataset, as described by its ``dataset.json``.

    Attributes:
        name: Dataset name (its directory name under the root).
        classes: Class names; label ``i`` is ``classes[i]``.
        image_shape: Stored image shape (H, W, C) of every row's image.
        image_format: How ``image`` rows are stored: ``raw`` pixels, ``png`` or ``jpeg``.
        splits: Rows per split (``train``, ``val``, ``test``).
        files: Part files per split, with rows, size and sha256 each.
        fingerprint: Content hash over ``classes``, ``image_shape`` and ``files``.
        provenance: How it was made (builder, arguments, seed, source, versions, time).
        path: The dataset directory or URI (not stored in ``dataset.json``; set when loading).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]
    image_format: Literal["raw", "png", "jpeg"] = "raw"
    splits: dict[str, int]
    files: dict[str, tuple[ShardInfo, ...]]
    fingerprint: str
    provenance: Provenance
    path: str = Field(exclude=True)

    @model_validator(mode="after")
    def _check_consistent(self) -> DatasetInfo:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version is {self.format_version}, this dtlray reads {FORMAT_VERSION}"
            )
        validate_name(self.name)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be at least two distinct names, got {self.classes}")
        height, width, channels = self.image_shape
        if height < 1 or width < 1 or channels not in (1, 3):
            raise ValueError(f"image_shape must be (H>0, W>0, C in 1|3), got {self.image_shape}")
        if set(self.splits) != set(SPLITS) or set(self.files) != set(SPLITS):
            raise ValueError(f"splits and files must list exactly {SPLITS}")
        for split in SPLITS:
            listed = sum(shard.rows for shard in self.files[split])
            if listed != self.splits[split]:
                raise ValueError(
                    f"split {split!r} has {self.splits[split]} rows but its files list {listed}"
                )
            for shard in self.files[split]:
                relative = Path(shard.file)
                if (
                    relative.is_absolute()
                    or relative.parts[:1] != (split,)
                    or ".." in relative.parts
                ):
                    raise ValueError(f"file {shard.file!r} of split {split!r} is outside {split}/")
        expected = compute_fingerprint(
            self.classes, self.image_shape, self.files, self.image_format
        )
        if self.fingerprint != expected:
            raise ValueError(
                "fingerprint does not match the listed files (dataset.json was edited)"
            )
        return self

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classes)

    @property
    def num_rows(self) -> int:
        """Rows over all splits."""
        return sum(self.splits.values())

    @property
    def root(self) -> str:
        """The data root the dataset lives in (path or URI)."""
        return self.path.rstrip("/").rsplit("/", 1)[0]

    def split_files(self, split: str) -> list[str]:
        """Absolute paths (or URIs) of the part files of ``split``, in order.

        Args:
            split: ``train``, ``val`` or ``test``.

        Returns:
            The part files listed in ``dataset.json`` (not checked on disk; see
            :func:`dtlray.data.validate_split`).

        Raises:
            DtlrayError: ``split`` is not one of the dataset's splits.
        """
        if split not in self.files:
            raise DtlrayError(
                f"dataset {self.name!r} has no split {split!r}: use one of {', '.join(SPLITS)}"
            )
        return [join(self.path, shard.file) for shard in self.files[split]]

    def to_json(self) -> str:
        """The ``dataset.json`` text (everything but ``path``)."""
        return self.model_dump_json(indent=2) + "\n"


def read_info(path: str) -> DatasetInfo:
    """Read ``<path>/dataset.json`` into a :class:`DatasetInfo` whose ``path`` is ``path``.

    Args:
        path: The dataset directory or URI.

    Raises:
        FileNotFoundError: There is no ``dataset.json``.
        DtlrayError: It exists but is not valid, or the object store failed (one line each).
    """
    import pyarrow.fs as pafs

    info_file = join(path, INFO_FILE)
    fs, inner = filesystem(info_file)
    try:
        if fs.get_file_info(inner).type != pafs.FileType.File:
            raise FileNotFoundError(info_file)
        with fs.open_input_stream(inner) as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise
    except OSError as err:
        raise storage_error(info_file, err) from None
    fix = f"rebuild it with `dtlray data prepare {path.rstrip('/').rsplit('/', 1)[-1]} --force`"
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return DatasetInfo.model_validate({**data, "path": path})
    except (ValueError, ValidationError) as err:  # ValidationError is a ValueError; both named
        summary = str(err).replace("\n", " ")
        raise DtlrayError(
            f"{info_file} is not a valid dataset description ({summary}): {fix}"
        ) from err


def load_info(name: str, root: str | os.PathLike[str] | None = None) -> DatasetInfo:
    """Load the description of a prepared dataset.

    Args:
        name: Dataset name.
        root: Data root (see :func:`resolve_root`).

    Returns:
        The dataset's :class:`DatasetInfo`.

    Raises:
        DatasetNotPrepared: The dataset is not prepared under the root (the message says how to
            prepare it).
        DtlrayError: The name is invalid, its ``dataset.json`` is invalid, or the root is a URI
            whose bucket, endpoint or credentials do not work (one line each).
    """
    resolved = resolve_root(root)
    path = join(resolved, validate_name(name))
    try:
        return read_info(path)
    except FileNotFoundError:
        pass
    check_location(resolved)  # a missing bucket says so, not "not prepared"
    if name in BUILTIN_DATASETS:
        how = f"`dtlray data prepare {name} --root {resolved}`"
    else:
        how = f"`dtlray data prepare --image-folder DIR --name {name} --root {resolved}`"
    present = list_dataset_names(resolved)
    there = f" (prepared there: {', '.join(present)})" if present else ""
    raise DatasetNotPrepared(f"dataset {name!r} is not prepared in {resolved}{there}: run {how}")


def list_dataset_names(root: str) -> list[str]:
    """Names of the directories under ``root`` (path or URI) that hold a ``dataset.json``, sorted.

    Raises:
        DtlrayError: the root is a URI whose bucket, endpoint or credentials do not work.
    """
    import pyarrow.fs as pafs

    check_location(root)
    fs, inner = filesystem(root)
    try:
        entries = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        names = [
            entry.base_name
            for entry in entries
            if entry.type == pafs.FileType.Directory and not entry.base_name.startswith(".")
        ]
        found = fs.get_file_info([f"{inner}/{name}/{INFO_FILE}" for name in names])
    except OSError as err:
        raise storage_error(root, err) from None
    return sorted(
        name for name, info in zip(names, found, strict=True) if info.type == pafs.FileType.File
    )
