"""DeadTapConv2d: the kernel taps that see only padding are skipped, with exactly the same math."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from dtlray.models import build_backbone
from dtlray.models.conv import DeadTapConv2d, live_taps, restore_full_kernels, skip_dead_taps


@pytest.mark.parametrize(
    ("args", "taps"),
    [
        ((1, 3, 1, 1, 1), (1, 1)),  # ResNet layer4 at 32 px: a 1x1 map, only the centre tap
        ((2, 3, 2, 1, 1), (1, 2)),  # layer4's stride-2 entry conv on a 2x2 map
        ((2, 3, 1, 1, 1), (0, 2)),  # a 2x2 map reaches every tap of a 3x3 kernel
        ((7, 3, 1, 1, 1), (0, 2)),
        ((1, 7, 2, 3, 1), (3, 3)),
        ((1, 3, 1, 2, 2), (1, 1)),  # dilated
        ((4, 5, 1, 0, 1), (0, 4)),  # no padding: every tap is live
    ],
)
def test_live_taps(args: tuple[int, int, int, int, int], taps: tuple[int, int]) -> None:
    assert live_taps(*args) == taps


@pytest.mark.parametrize("height", [1, 2, 3, 5])
def test_dead_tap_conv_matches_the_full_conv_and_its_gradients(height: int) -> None:
    torch.manual_seed(0)
    cropped = 0
    for width, kernel, stride, padding, dilation in itertools.product(
        [1, 2, 4], [1, 2, 3, 5, (3, 1)], [1, 2, 3], [0, 1, 2, 3], [1, 2]
    ):
        conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
        conv = conv.double()
        x = torch.randn(2, 3, height, width, dtype=torch.double, requires_grad=True)
        try:
            expected = conv(x)
        except RuntimeError:  # the kernel does not fit this input at all
            continue
        dead = DeadTapConv2d.like(conv)
        assert dead.weight is conv.weight and dead.bias is conv.bias
        params = [x, conv.weight, conv.bias]
        grads = torch.autograd.grad(expected.square().sum(), params)
        out = dead(x)
        case = (height, width, kernel, stride, padding, dilation)
        assert out.shape == expected.shape, case
        torch.testing.assert_close(out, expected, msg=str(case))
        for got, want in zip(torch.autograd.grad(out.square().sum(), params), grads, strict=True):
            torch.testing.assert_close(got, want, msg=str(case))
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        cropped += live_taps(height, kh, sh, ph, dh) != (0, kh - 1)
        cropped += live_taps(width, kw, sw, pw, dw) != (0, kw - 1)
    assert cropped > 0  # the sweep did exercise cropped kernels


def test_resnet18_at_32px_crops_layer4_and_keeps_torchvision_results() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=3, small_input=False).double()
    body = backbone.body
    assert all(type(m) is not nn.Conv2d or m.kernel_size == (1, 1) for m in body.modules())
    assert isinstance(body.layer4[1].conv2, DeadTapConv2d)
    # Same keys and tensors as plain torchvision: checkpoints and ImageNet weights still load.
    plain = tvm.resnet18()
    plain.fc = nn.Identity()
    plain.load_state_dict(body.state_dict())
    plain = plain.double()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in body.named_parameters()]

    x = torch.randn(4, 3, 32, 32, dtype=torch.double)  # layer4 sees 1x1 maps
    out, expected = body(x), plain(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, got), want in zip(body.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    # The taps that see only padding get exactly zero gradient, as they do in the full conv.
    centre_only = body.layer4[1].conv1.weight.grad.clone()
    centre_only[:, :, 1, 1] = 0
    assert centre_only.abs().max() == 0


def test_channels_last_float_model_matches_torchvision() -> None:
    torch.manual_seed(0)
    body = build_backbone("resnet18", in_channels=1, small_input=False).body
    plain = tvm.resnet18()
    plain.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    plain.fc = nn.Identity()
    plain.load_state_dict(body.state_dict())
    x = torch.randn(8, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    body, plain = (m.to(memory_format=torch.channels_last) for m in (body, plain))
    torch.testing.assert_close(body(x), plain(x), rtol=1e-4, atol=1e-5)


def test_skip_dead_taps_leaves_1x1_and_non_zero_padding_alone() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)),
    )
    assert skip_dead_taps(model) == 1
    assert [type(m) for m in model.modules() if isinstance(m, nn.Conv2d)] == [
        nn.Conv2d,
        nn.Conv2d,
        nn.Conv2d,
        DeadTapConv2d,
    ]
    with pytest.raises(ValueError, match="needs numeric zero padding"):
        DeadTapConv2d.like(model[1])


def test_dead_tap_conv_under_bf16_autocast_matches_the_full_conv() -> None:
    # resources.precision: bf16 runs convolutions under CPU autocast; the cropped kernel must
    # take the same bf16 path as the full one.
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    dead = DeadTapConv2d.like(conv)
    x = torch.randn(4, 16, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = dead(x), conv(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_restore_full_kernels_undoes_skip_dead_taps_with_the_same_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    weights = [p for p in model.parameters()]
    assert skip_dead_taps(model) == 1
    assert restore_full_kernels(model) == 1
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]
    assert all(a is b for a, b in zip(model.parameters(), weights, strict=True))
