"""Stored image formats: raw pixel rows, PNG or JPEG, and decoding them to raw rows at a size.

A dataset's ``image`` column holds one row per image. ``raw`` rows are the ``H*W*C`` uint8 pixel
bytes, which the training worker views as a tensor without decoding
(:func:`dtlray.data.decode.decode_uint8`). ``png`` and ``jpeg`` rows are encoded files (224 px
photographs: PNG about half the raw bytes, JPEG a tenth); they are decoded, and resized to the
model's input size, on the CPUs of Ray Data (:class:`DecodeBatch` in ``map_batches``) ahead of
the trainer, so the worker receives raw rows already at its input size and
:func:`~dtlray.data.decode.to_model_input` does no resize.

Resizing is PIL's bilinear filter, which widens its kernel when shrinking: the antialiased
bilinear of ``torch.nn.functional.interpolate(..., antialias=True)`` that ``to_model_input`` uses
(torch's was written to match PIL's). Measured on 224 px photo crops, the two agree to 0.26 grey
levels on average at 224 -> 32 (max 0.9, the rounding to uint8 here). JPEG's draft mode (libjpeg
scales the DCT by 1/2 to 1/8 while decoding) would decode 224 -> 32 about twice as fast but
departs from that filter by 0.9 levels on average (max 16), so it is not used.

Decode speed on one core (2-core x86 VM, load average 0.6, Pillow 13 with libjpeg-turbo, 224 px
RGB photo crops at :data:`JPEG_QUALITY`): :func:`decode_images` delivers about 3,500 JPEG
images/s at 224 -> 224 and 2,600/s at 224 -> 32; raw 224 -> 32 about 6,300/s
(``bench/ingest.py`` prints the numbers of the machine it runs on).

Nothing here imports torch or Ray.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
from PIL import Image

from dtlray.errors import DtlrayError

IMAGE_FORMATS: Final = ("raw", "png", "jpeg")
"""Values of a dataset's image format: how each ``image`` row is stored."""

JPEG_QUALITY: Final = 90
"""libjpeg quality of stored JPEGs (chroma subsampled 4:2:0, PIL's default).

90 keeps the decoded pixels within about 2.5 grey levels of the original on average (224 px
photo crops; 3.4 at 75, 2.0 at 95) at about a tenth of the raw bytes (0.095; 0.14 at 95): the
error is below the noise of a random crop or a colour jitter, and the size well under the 1/5 of
raw that makes JPEG worth decoding.
"""

ImageColumn = pa.Array | pa.ChunkedArray

_PIL_FORMATS: Final = {"png": "PNG", "jpeg": "JPEG"}
_SIGNATURES: Final = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
_MODES: Final = {1: "L", 3: "RGB"}
_FIX: Final = "rebuild it with `dtlray data prepare {name} --force`"


def encode_images(images: np.ndarray, image_format: str) -> pa.Array:
    """Encode images as one ``image`` column.

    Args:
        images: ``(N, H, W, C)`` uint8 images, ``C`` in {1, 3}.
        image_format: One of :data:`IMAGE_FORMATS`. ``raw`` rows are the ``H*W*C`` pixel bytes
            (built from one buffer, no Python object per row); ``png`` is lossless (zlib level
            6); ``jpeg`` is lossy at :data:`JPEG_QUALITY`.

    Returns:
        A ``binary`` array (``large_binary`` if it holds 2 GiB or more), one row per image.

    Raises:
        DtlrayError: ``image_format`` is unknown.
        ValueError: ``images`` is not a 4-D uint8 array with 1 or 3 channels.
    """
    check_image_format(image_format)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in _MODES:
        raise ValueError(
            f"expected (N, H, W, C in 1|3) uint8 images, got {images.shape} {images.dtype}"
        )
    count, height, width, channels = images.shape
    if image_format == "raw":
        return raw_rows_to_array(images)
    mode = _MODES[channels]
    options = {"quality": JPEG_QUALITY} if image_format == "jpeg" else {"compress_level": 6}
    rows = []
    for image in images:
        sink = io.BytesIO()
        pixels = image[:, :, 0] if channels == 1 else image
        Image.fromarray(pixels, mode=mode).save(sink, _PIL_FORMATS[image_format], **options)
        rows.append(sink.getvalue())
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=count)
    return _binary_from_buffers(b"".join(rows), lengths)


def raw_rows_to_array(images: np.ndarray) -> pa.Array:
    """``(N, ...)`` uint8 images as a binary array of their raw bytes, one row per image.

    Args:
        images: Any uint8 array; row ``i`` is ``images[i]``'s bytes in C order.

    Returns:
        A ``binary`` array (``large_binary`` at 2 GiB or more) over one copy of the pixels.
    """
    count = len(images)
    row_bytes = int(np.prod(images.shape[1:]))
    data = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)
    return _binary_from_buffers(data, np.full(count, row_bytes, dtype=np.int64))


def check_encoded(images: ImageColumn, image_format: str, *, dataset: str | None = None) -> None:
    """Check cheaply (the first bytes of every row) that rows are stored as ``image_format`` says.

    ``png`` and ``jpeg`` rows must start with their file signature. Raw pixels have none, so a
    ``raw`` column fails only when every row starts with a PNG or JPEG signature (a raw row that
    happens to begin like one is possible; all of them are not).

    Args:
        images: The ``image`` column (or a batch of it).
        image_format: The format the dataset records.
        dataset: The dataset's name, for the message's fix.

    Raises:
        DtlrayError: A row is null, or the rows are not what ``image_format`` says; the message
            names the recorded format, what the rows hold and the fix.
    """
    check_image_format(image_format)
    _check_signatures(*binary_parts(images, dataset), image_format, dataset)


def _check_signatures(
    offsets: np.ndarray, data: np.ndarray, image_format: str, dataset: str | None
) -> None:
    """:func:`check_encoded` on rows already cut out of their column (``binary_parts``)."""
    count = len(offsets) - 1
    if count == 0:
        return
    if image_format == "raw":
        for other, signature in _SIGNATURES.items():
            if _starts_with(offsets, data, signature).all():
                raise _format_error(count, count, 0, f"{other.upper()} files", "raw", dataset)
        return
    wrong = np.flatnonzero(~_starts_with(offsets, data, _SIGNATURES[image_format]))
    if wrong.size:
        row = int(wrong[0])
        found = _describe_row(bytes(data[offsets[row] : min(offsets[row + 1], offsets[row] + 8)]))
        raise _format_error(int(wrong.size), count, row, found, image_format, dataset)


def decode_images(
    images: ImageColumn,
    image_format: str,
    stored_shape: Sequence[int],
    out_size: int | None = None,
    *,
    dataset: str | None = None,
) -> pa.Array:
    """Decode a batch of stored rows to raw uint8 rows, resized to ``out_size`` when given.

    Args:
        images: The ``image`` column: rows stored as ``image_format``, each of ``stored_shape``.
        image_format: One of :data:`IMAGE_FORMATS`, as the dataset records.
        stored_shape: ``(H, W, C)`` of every stored image (``DatasetInfo.image_shape``).
        out_size: Height and width of the output (bilinear, antialiased when shrinking); None
            keeps the stored size.
        dataset: The dataset's name, for the messages' fix.

    Returns:
        A binary array of raw rows of :func:`delivered_image_shape` bytes each. Raw rows already
        at that shape come back as they are (chunks combined).

    Raises:
        DtlrayError: The rows are not ``image_format`` (see :func:`check_encoded`), a row does
            not decode, or a decoded image's size or mode differs from ``stored_shape``; each
            message names the row and the fix.
        ValueError: ``stored_shape`` or ``out_size`` is invalid.
    """
    check_image_format(image_format)
    height, width, channels = check_stored_shape(stored_shape)
    out_h, out_w, _ = delivered_image_shape((height, width, channels), out_size)
    resize = (out_h, out_w) != (height, width)
    if image_format == "raw":
        rows = raw_rows(images, height * width * channels, dataset)
        if not resize:
            return images.combine_chunks() if isinstance(images, pa.ChunkedArray) else images
        source = rows.reshape(-1, height, width, channels)
        out = np.empty((len(source), out_h, out_w, channels), dtype=np.uint8)
        for i, image in enumerate(source):
            pixels = image[:, :, 0] if channels == 1 else image
            resized = Image.fromarray(pixels, mode=_MODES[channels]).resize(
                (out_w, out_h), Image.Resampling.BILINEAR
            )
            out[i] = np.asarray(resized).reshape(out_h, out_w, channels)
        return raw_rows_to_array(out)

    offsets, data = binary_parts(images, dataset)  # once: several chunks are combined, a copy
    _check_signatures(offsets, data, image_format, dataset)
    buffer = data.data  # memoryview over the Arrow data buffer(s): rows are slices, no copies
    out = np.empty((len(offsets) - 1, out_h, out_w, channels), dtype=np.uint8)
    expected = (_PIL_FORMATS[image_format], _MODES[channels], (width, height))
    for i in range(len(out)):
        try:
            with Image.open(io.BytesIO(buffer[offsets[i] : offsets[i + 1]])) as image:
                found = (image.format, image.mode, image.size)  # header only, nothing decoded yet
                if found != expected:
                    raise _shape_error(i, found, expected, dataset)
                if resize:
                    image = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
                out[i] = np.asarray(image).reshape(out_h, out_w, channels)
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for damaged files
            raise DtlrayError(
                f"image row {i} of the batch is a damaged {image_format.upper()} file "
                f"({error}): {_FIX.format(name=dataset or 'NAME')}"
            ) from error
    return raw_rows_to_array(out)


@dataclass(frozen=True)
class DecodeBatch:
    """Ray Data ``map_batches`` function: decode and resize a batch's ``image`` column.

    Use with ``batch_format="pyarrow"``::

        decode = DecodeBatch("jpeg", info.image_shape, out_size=224)
        ds = ds.map_batches(decode, batch_format="pyarrow")
        # rows: raw uint8 bytes of decode.image_shape; decode_uint8(batch["image"],
        # decode.image_shape) in the worker

    Picklable and stateless, so Ray Data runs it as a task per block.

    Attributes:
        image_format: The dataset's stored format, one of :data:`IMAGE_FORMATS`.
        stored_shape: ``(H, W, C)`` of the stored images.
        out_size: Height and width delivered; None keeps the stored size.
        dataset: The dataset's name, for error messages.

    Raises:
        DtlrayError: ``image_format`` is unknown.
        ValueError: ``stored_shape`` or ``out_size`` is invalid.
    """

    image_format: str
    stored_shape: tuple[int, int, int]
    out_size: int | None = None
    dataset: str | None = None

    def __post_init__(self) -> None:
        check_image_format(self.image_format)
        object.__setattr__(self, "stored_shape", check_stored_shape(self.stored_shape))
        delivered_image_shape(self.stored_shape, self.out_size)  # validates out_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the rows this delivers."""
        return delivered_image_shape(self.stored_shape, self.out_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with its ``image`` column decoded to raw rows of :attr:`image_shape`.

        Args:
            batch: An Arrow table with an ``image`` column (other columns, e.g. ``label``, are
                passed through unchanged).

        Returns:
            The same table with ``image`` replaced.

        Raises:
            DtlrayError: See :func:`decode_images`.
        """
        if self.image_format == "raw" and self.image_shape == self.stored_shape:
            return batch  # nothing to do; decode_uint8 checks the row lengths
        index = batch.schema.get_field_index("image")
        if index < 0:
            raise ValueError(f"the batch has no 'image' column, only {batch.column_names}")
        decoded = decode_images(
            batch.column(index),
            self.image_format,
            self.stored_shape,
            self.out_size,
            dataset=self.dataset,
        )
        return batch.set_column(index, "image", decoded)


def delivered_image_shape(
    stored_shape: Sequence[int], out_size: int | None
) -> tuple[int, int, int]:
    """``(H, W, C)`` of decoded rows: ``(out_size, out_size, C)``, or the stored shape for None.

    Raises:
        ValueError: ``stored_shape`` is invalid or ``out_size`` is not a positive int.
    """
    height, width, channels = check_stored_shape(stored_shape)
    if out_size is None:
        return height, width, channels
    if isinstance(out_size, bool) or not isinstance(out_size, int | np.integer) or out_size < 1:
        raise ValueError(f"out_size must be a positive int or None, got {out_size!r}")
    return int(out_size), int(out_size), channels


def check_image_format(image_format: str) -> str:
    """``image_format`` if it is one of :data:`IMAGE_FORMATS`; DtlrayError listing them if not."""
    if image_format not in IMAGE_FORMATS:
        raise DtlrayError(
            f"unknown image format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}"
        )
    return image_format


def check_stored_shape(stored_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(H, W, C)`` as ints, ``H, W >= 1`` and ``C`` in {1, 3}; ValueError otherwise."""
    shape = tuple(int(d) for d in stored_shape)
    if len(shape) != 3 or min(shape[:2], default=0) < 1 or shape[2] not in _MODES:
        raise ValueError(f"stored_shape must be (H>0, W>0, C in 1|3), got {stored_shape}")
    return shape  # type: ignore[return-value]


# -- Arrow binary buffers -----------------------------------------------------------------------


def _binary_from_buffers(data: bytes | np.ndarray, lengths: np.ndarray) -> pa.Array:
    """A binary array over ``data`` cut into rows of ``lengths`` bytes (no per-row objects)."""
    total = int(lengths.sum())
    large = total >= 2**31
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(
        pa.large_binary() if large else pa.binary(),
        len(lengths),
        [None, pa.py_buffer(offsets), pa.py_buffer(data)],
    )


def binary_parts(images: ImageColumn, dataset: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets ``(N + 1,)`` int64 into one uint8 data array, for any Arrow binary column
    (``binary``, ``large_binary``, ``binary_view``, ``fixed_size_binary``; sliced or not).

    A single chunk is read in place; several chunks (Ray's batches) are combined first.

    Raises:
        DtlrayError: a row is null (the message's fix names ``dataset``).
        TypeError: not a binary column.
    """
    if isinstance(images, pa.ChunkedArray):
        if images.num_chunks == 0:
            images = pa.array([], images.type)
        elif images.num_chunks == 1:
            images = images.chunk(0)
        else:
            images = images.combine_chunks()
    if not isinstance(images, pa.Array):
        raise TypeError(f"images must be a pyarrow binary array, got {type(images).__name__}")
    if images.null_count:
        raise DtlrayError(
            f"{images.null_count} image rows are null: the data is damaged; "
            f"{_FIX.format(name=dataset or 'NAME')}"
        )
    kind = images.type
    if pa.types.is_binary_view(kind):
        images = images.cast(pa.large_binary())
        kind = images.type
    count = len(images)
    if pa.types.is_fixed_size_binary(kind):
        width = kind.byte_width
        offsets = (np.arange(count + 1, dtype=np.int64) + images.offset) * width
        data_buffer = images.buffers()[1]
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        offset_type = np.int32 if pa.types.is_binary(kind) else np.int64
        _, offset_buffer, data_buffer = images.buffers()
        # a sliced array's offsets start at images.offset; its values need not start at byte 0
        offsets = np.frombuffer(
            offset_buffer,
            dtype=offset_type,
            count=count + 1,
            offset=images.offset * np.dtype(offset_type).itemsize,
        ).astype(np.int64)
    else:
        raise TypeError(f"image column must be binary, got Arrow type {kind}")
    if data_buffer is None or count == 0:
        return np.zeros(count + 1, dtype=np.int64), np.empty(0, dtype=np.uint8)
    return offsets, np.frombuffer(data_buffer, dtype=np.uint8)


def raw_rows(images: ImageColumn, row_bytes: int, dataset: str | None = None) -> np.ndarray:
    """Raw rows as a ``(N, row_bytes)`` uint8 view (no copy of a single chunk), every row's
    length checked.

    Raises:
        DtlrayError: a row is null or not ``row_bytes`` long (the message names it and the fix).
    """
    offsets, data = binary_parts(images, dataset)
    lengths = np.diff(offsets)
    wrong = np.flatnonzero(lengths != row_bytes)
    if wrong.size:
        raise row_length_error(int(wrong[0]), int(lengths[wrong[0]]), row_bytes, dataset)
    count = len(lengths)
    if count == 0:
        return np.empty((0, row_bytes), dtype=np.uint8)
    start = int(offsets[0])  # raw rows are contiguous
    return data[start : start + count * row_bytes].reshape(count, row_bytes)


def row_length_error(row: int, length: int, row_bytes: int, dataset: str | None) -> DtlrayError:
    """The error for a raw row whose length is not the dataset's ``H*W*C``."""
    return DtlrayError(
        f"image row {row} has {length} bytes, but the dataset's image shape needs {row_bytes} "
        f"(H*W*C): the data does not match its dataset.json; {_FIX.format(name=dataset or 'NAME')}"
    )


def _starts_with(offsets: np.ndarray, data: np.ndarray, signature: bytes) -> np.ndarray:
    """``(N,)`` bool: whether each row starts with ``signature`` (vectorised over rows)."""
    starts = offsets[:-1]
    long_enough = np.diff(offsets) >= len(signature)
    result = long_enough.copy()
    rows = starts[long_enough]
    if rows.size:
        heads = data[rows[:, None] + np.arange(len(signature))]  # (rows, len(signature))
        result[long_enough] = (heads == np.frombuffer(signature, dtype=np.uint8)).all(axis=1)
    return result


def _describe_row(head: bytes) -> str:
    """What a row's first bytes say it is, for messages."""
    for name, signature in _SIGNATURES.items():
        if head.startswith(signature):
            return f"{name.upper()} files"
    if not head:
        return "empty rows"
    return f"no PNG or JPEG signature (first bytes {head.hex()}: raw pixels?)"


def _format_error(
    bad: int, count: int, row: int, found: str, image_format: str, dataset: str | None
) -> DtlrayError:
    return DtlrayError(
        f"{bad} of {count} image rows in the batch (first: row {row}) hold {found}, but "
        f"{dataset or 'the dataset'}'s dataset.json records image_format {image_format!r}: "
        f"the data does not match its dataset.json; {_FIX.format(name=dataset or 'NAME')}"
    )


def _shape_error(
    row: int,
    found: tuple[str | None, str, tuple[int, int]],
    expected: tuple[str, str, tuple[int, int]],
    dataset: str | None,
) -> DtlrayError:
    def describe(spec: tuple[str | None, str, tuple[int, int]]) -> str:
        image_format, mode, (width, height) = spec
        return f"{image_format} {mode} {height}x{width} (H x W)"

    return DtlrayError(
        f"image row {row} of the batch decodes to {describe(found)}, but "
        f"{dataset or 'the dataset'}'s dataset.json records {describe(expected)}: the data does "
        f"not match its dataset.json; {_FIX.format(name=dataset or 'NAME')}"
    )
