"""Convolutions that skip the kernel taps which can only ever multiply zero padding.

On a small feature map, a padded convolution has taps that never reach a real pixel: on a 1x1
map a 3x3 convolution with padding 1 uses only its centre tap. That is ResNet's ``layer4`` on
32 px images with the standard stem. The other eight taps multiply zeros in the forward pass and
get exactly zero gradient, yet oneDNN computes all nine. On a CPU its backward for that shape
takes about 20x as long as the equivalent 1x1 convolution, which made it half of a ResNet-18
train step at 32 px.

:class:`DeadTapConv2d` crops its kernel, per input size, to the taps that can reach the input,
and shrinks the padding to match. The output and the gradients are those of the full convolution
up to float summation order (the cropped taps' gradient is exactly zero either way). The
parameter is still the full kernel, so state dicts, checkpoints and pretrained weights do not
change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DeadTapConv2d",
    "live_taps",
    "restore_full_kernels",
    "share_conv",
    "skip_dead_taps",
]

ConvT = TypeVar("ConvT", bound=nn.Conv2d)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@functools.cache
def live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """The first and last kernel tap that reach a real input pixel, along one spatial dim.

    Args:
        size: Input length along the dim, without padding.
        kernel: Kernel length.
        stride: Convolution stride.
        padding: Zero padding on each side.
        dilation: Kernel dilation.

    Returns:
        ``(first, last)``, inclusive. Taps outside that range see only padding at every output
        position. ``(0, kernel - 1)`` when the outermost taps reach the input, or when no tap
        does.
    """
    out = _out_size(size, kernel, stride, padding, dilation)
    live = []
    for tap in range(kernel):
        offset = tap * dilation - padding  # the input index this tap reads at output 0
        # Output positions o in [0, out) that read inside the input: 0 <= o*stride+offset < size
        first = max(0, -(offset // stride))  # ceil(-offset / stride)
        last = min(out - 1, (size - 1 - offset) // stride)
        if first <= last:
            live.append(tap)
    if not live:
        return (0, kernel - 1)
    return (live[0], live[-1])


@functools.cache
def _crop(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[slice, slice, tuple[int, int]] | None:
    """The kernel slices and padding that give the same output, or None to keep the full kernel."""
    slices, paddings = [], []
    for dim in range(2):
        first, last = live_taps(size[dim], kernel[dim], stride[dim], padding[dim], dilation[dim])
        cropped = padding[dim] - first * dilation[dim]
        same_size = _out_size(
            size[dim], last - first + 1, stride[dim], cropped, dilation[dim]
        ) == _out_size(size[dim], kernel[dim], stride[dim], padding[dim], dilation[dim])
        # Symmetric padding must still give the same output positions; if the live taps are
        # off-centre in a way it cannot express, keep the full kernel (still exact, just slower).
        if cropped < 0 or not same_size:
            first, last, cropped = 0, kernel[dim] - 1, padding[dim]
        slices.append(slice(first, last + 1))
        paddings.append(cropped)
    if tuple(paddings) == padding:
        return None
    return slices[0], slices[1], (paddings[0], paddings[1])


class DeadTapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (zero padding) that skips the kernel taps which see only padding.

    Build one from an existing conv with :meth:`like`, or convert a whole model with
    :func:`skip_dead_taps`.
    """

    @classmethod
    def like(cls, conv: nn.Conv2d) -> DeadTapConv2d:
        """A DeadTapConv2d with the same settings that shares ``conv``'s parameters."""
        if not _zero_padded(conv):
            raise ValueError(
                "DeadTapConv2d needs numeric zero padding, but got "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        return share_conv(conv, cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W)
        crop = _crop(
            (x.shape[-2], x.shape[-1]), self.kernel_size, self.stride, self.padding, self.dilation
        )
        if crop is None:
            return super().forward(x)
        rows, cols, padding = crop
        weight = self.weight[:, :, rows, cols]  # (C_out, C_in / groups, kh', kw')
        # (B, C_out, H_out, W_out), the same size as the full kernel's output
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def share_conv(conv: nn.Conv2d, cls: type[ConvT]) -> ConvT:
    """A ``cls`` convolution with ``conv``'s settings and mode that shares its parameters."""
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",  # skip allocating and initialising weights that are replaced below
    )
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


def _zero_padded(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _swap_convs(
    module: nn.Module, select: Callable[[nn.Module], bool], make: Callable[[nn.Conv2d], nn.Conv2d]
) -> int:
    """Replace, in place, every child module ``select`` picks by ``make(child)``; how many."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if select(child)
    ]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def skip_dead_taps(module: nn.Module) -> int:
    """Replace, in place, every zero-padded ``nn.Conv2d`` wider than 1x1 by a DeadTapConv2d.

    The replacements share the original parameters, so ``state_dict`` keys and the parameters'
    order do not change.

    Args:
        module: The model to convert.

    Returns:
        How many convolutions were replaced.
    """
    return _swap_convs(
        module,
        lambda m: type(m) is nn.Conv2d and max(m.kernel_size) > 1 and _zero_padded(m),
        DeadTapConv2d.like,
    )


def restore_full_kernels(module: nn.Module) -> int:
    """Undo :func:`skip_dead_taps` in place: every DeadTapConv2d becomes a plain ``nn.Conv2d``.

    For comparisons (``bench/dead_taps.py``): the parameters stay shared and unchanged.

    Returns:
        How many convolutions were replaced.
    """
    return _swap_convs(
        module, lambda m: isinstance(m, DeadTapConv2d), lambda c: share_conv(c, nn.Conv2d)
    )
