"""Image bytes -> model input tensors, vectorised (no Python loop over rows).

Stored rows are raw ``H*W*C`` uint8 bytes. :func:`decode_uint8` views a whole batch of them as one
``(B, H, W, C)`` array (zero-copy over the Arrow data buffer where it can) and makes one copy into
``(B, C, H, W)``; :func:`to_model_input` converts channels, resizes and normalises on whatever
device the tensor is on, so a GPU worker can move uint8 (4x fewer bytes) and convert there.
Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dtlray.data.codec import raw_rows, row_length_error

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

ImageBatch = pa.Array | pa.ChunkedArray | np.ndarray | Sequence[bytes]


def decode_uint8(images: ImageBatch, image_shape: Sequence[int]) -> torch.Tensor:
    """Decode a batch of raw image rows into a uint8 tensor.

    Args:
        images: One row of ``H*W*C`` bytes per image: a pyarrow ``binary``/``large_binary``/
            ``fixed_size_binary`` array or chunked array, a numpy object array of ``bytes`` (what
            Ray's numpy batches hold), a numpy ``S`` array, or a list of ``bytes``.
        image_shape: Stored shape ``(H, W, C)`` (``DatasetInfo.image_shape``).

    Returns:
        A ``(B, C, H, W)`` uint8 CPU tensor.

    Raises:
        DtlrayError: A row is null or does not have exactly ``H*W*C`` bytes.
        TypeError: ``images`` is of an unsupported type.
    """
    height, width, channels = check_image_shape(image_shape)
    row_bytes = height * width * channels
    if isinstance(images, pa.ChunkedArray):  # Ray's Arrow batches: decode chunk by chunk
        parts = images.chunks or [pa.array([], pa.binary())]
    else:
        parts = [images]
    views = [_as_rows(part, row_bytes) for part in parts]  # (b, H*W*C), in place where possible
    batch = np.empty((sum(map(len, views)), channels, height, width), dtype=np.uint8)
    start = 0
    for rows in views:
        hwc = rows.reshape(-1, height, width, channels)
        np.copyto(batch[start : start + len(rows)], hwc.transpose(0, 3, 1, 2))  # the one copy
        start += len(rows)
    return torch.from_numpy(batch)


def to_model_input(
    x: torch.Tensor, size: int, channels: int, mean: float = 0.5, std: float = 0.5
) -> torch.Tensor:
    """Turn a uint8 image batch into normalised float model input of a given size and channels.

    Grey -> RGB repeats the channel; RGB -> grey uses ITU-R 601-2 luma weights (as PIL). Resizes
    (bilinear, antialiased when shrinking) only when the size differs. Runs on ``x``'s device.

    Args:
        x: ``(B, C, H, W)`` uint8 tensor, ``C`` in {1, 3}.
        size: Output height and width.
        channels: Output channels, 1 or 3.
        mean: Subtracted after scaling to [0, 1].
        std: Divisor after subtracting ``mean``.

    Returns:
        ``(B, channels, size, size)`` float32 tensor ``(x / 255 - mean) / std``.

    Raises:
        ValueError: ``x`` is not a 4-D uint8 tensor with 1 or 3 channels, or ``size``,
            ``channels`` or ``std`` is invalid.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"expected a (B, C in 1|3, H, W) uint8 tensor, got {tuple(x.shape)} {x.dtype}"
        )
    if channels not in (1, 3) or size < 1 or std == 0:
        raise ValueError(
            f"need channels in 1|3, size >= 1, std != 0; got {channels}, {size}, {std}"
        )
    out = x.to(torch.float32).div_(255.0)  # (B, C, H, W) in [0, 1]
    if out.shape[1] == 3 and channels == 1:  # before resizing: a third of the work
        weights = torch.tensor(_LUMA_WEIGHTS, dtype=out.dtype, device=out.device)
        out = torch.einsum("bchw,c->bhw", out, weights).unsqueeze(1)  # (B, 1, H, W)
    height, width = out.shape[-2:]
    if (height, width) != (size, size):
        out = F.interpolate(
            out,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=size < height or size < width,
        )
    out = out.sub_(mean).div_(std)
    if out.shape[1] == 1 and channels == 3:  # after resizing: a third of the work
        out = out.repeat(1, 3, 1, 1)  # (B, 3, size, size)
    return out


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """``image_shape`` as a tuple of three positive ints ``(H, W, C)``; ValueError otherwise."""
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}")
    return shape  # type: ignore[return-value]


def _as_rows(images: ImageBatch, row_bytes: int) -> np.ndarray:
    """View a batch of rows as a ``(B, row_bytes)`` uint8 array, checking every row's length."""
    if isinstance(images, pa.Array):
        return raw_rows(images, row_bytes)
    if isinstance(images, np.ndarray) and images.dtype.kind == "S":
        if images.dtype.itemsize != row_bytes:  # numpy pads fixed-width bytes; no row lengths
            raise row_length_error(0, images.dtype.itemsize, row_bytes, None)
        return np.ascontiguousarray(images).reshape(-1).view(np.uint8).reshape(-1, row_bytes)
    if (
        isinstance(images, np.ndarray)
        and images.dtype == object
        or isinstance(images, list | tuple)
    ):
        return _bytes_rows(images, row_bytes)
    raise TypeError(
        "images must be a pyarrow binary array, a numpy array of bytes or a list of bytes, "
        f"got {type(images).__name__}"
    )


def _bytes_rows(rows: Sequence[Any], row_bytes: int) -> np.ndarray:
    count = len(rows)
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=count)
    wrong = np.flatnonzero(lengths != row_bytes)
    if wrong.size:
        raise row_length_error(int(wrong[0]), int(lengths[wrong[0]]), row_bytes, None)
    if count == 0:
        return np.empty((0, row_bytes), dtype=np.uint8)
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(count, row_bytes)
