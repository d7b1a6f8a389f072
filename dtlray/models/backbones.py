"""Backbone registry: torchvision VGG and ResNet classifiers turned into pooled feature extractors.

The names, their families and input-size limits are listed once, without torch, in
:mod:`dtlray.models.registry`; a name's builder and weights enum come from torchvision's own
registry (``get_model_builder``/``get_model_weights``, its ``models/_api.py``), so an unknown name
fails with the list of valid ones instead of reaching into a module by attribute. Every backbone
returns a pooled ``(B, out_features)`` vector; the classification head is dropped because dtlray
puts its own fusion module and heads on top.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from dtlray.errors import DtlrayError
from dtlray.models.conv import skip_dead_taps
from dtlray.models.registry import backbone_family, min_input_size

__all__ = ["Backbone", "build_backbone"]

logger = logging.getLogger(__name__)

#: Set to 1/true/yes to forbid any weights download (tests, air-gapped clusters): a weights file
#: missing from the torch hub cache then fails at once instead of trying the network.
OFFLINE_ENV = "DTLRAY_OFFLINE"

_WEIGHTS_CHOICES = ("imagenet",)
_VGG_SMALL_INPUT_DROPPED_POOLS = 2


@dataclass(frozen=True)
class _BackboneSpec:
    """How to build one registry entry: its torchvision builder and weights enum."""

    builder: Callable[..., nn.Module]
    weights: type[WeightsEnum]

    @classmethod
    def of(cls, name: str) -> _BackboneSpec:
        # Every registry name is a torchvision builder name (test_models checks them all).
        return cls(tvm.get_model_builder(name), tvm.get_model_weights(name))


class Backbone(nn.Module):
    """A torchvision classifier with its classification head removed.

    Attributes:
        name: The registry name, e.g. ``"resnet18"``.
        out_features: Width of the pooled feature vector (ResNet 512 or 2048, VGG 512).
        min_input_size: The smallest image side (px) the network's downsampling can take.
        body: The torchvision model; its head is an ``nn.Identity`` and (VGG) its pool is 1x1.
    """

    def __init__(self, name: str, body: nn.Module, out_features: int, min_input_size: int) -> None:
        super().__init__()
        self.name = name
        self.out_features = out_features
        self.min_input_size = min_input_size
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a batch of images.

        Args:
            x: Images, shape ``(B, C, H, W)``, at least ``min_input_size`` px on each side.

        Returns:
            Features, shape ``(B, out_features)``.
        """
        # (B, C, H, W)
        # TrialConfig rejects an image_size below the minimum, so this only fires for a caller
        # that skipped it; torch would fail deep inside a pooling layer ("Output size is too
        # small") without naming the backbone.
        assert min(x.shape[-2:]) >= self.min_input_size, (
            f"backbone {self.name!r} needs images of at least {self.min_input_size} px, "
            f"got {x.shape[-2]}x{x.shape[-1]}"
        )
        return self.body(x)  # (B, out_features)


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    small_input: bool = False,
    weights: str | None = None,
) -> Backbone:
    """Build a registry backbone as a pooled feature extractor.

    Args:
        name: A name from :func:`~dtlray.models.list_backbones`.
        in_channels: Image channels (1 for grey, 3 for RGB). With pretrained weights a grey first
            conv is initialised from the sum of the RGB filters.
        small_input: Adapt the network to 28-64 px images. ResNet gets a 3x3 stride-1 stem conv
            and no stem max-pool; VGG drops its last two max-pools.
        weights: ``None`` for random init (seed torch before calling) or ``"imagenet"`` for
            torchvision's ``DEFAULT`` ImageNet weights, taken from the torch hub cache or
            downloaded once into it.

    Returns:
        The backbone, in training mode, on torch's default device. Its zero-padded convs are
        :class:`~dtlray.models.conv.DeadTapConv2d`: they skip the kernel taps that see only
        padding on small maps, with the same parameters and results.

    Raises:
        DtlrayError: If the name or the weights value is unknown, or the ImageNet weights are
            neither in the torch hub cache nor downloadable.
        ValueError: If ``in_channels < 1``.
    """
    family = backbone_family(name)  # an unknown name fails here, listing the valid ones
    if weights is not None and weights not in _WEIGHTS_CHOICES:
        raise DtlrayError(
            f"Unknown weights {weights!r} for backbone {name!r}: use `weights: imagenet` for "
            "torchvision's ImageNet weights or `weights: null` for random init."
        )
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, but got {in_channels}")

    pretrained = weights == "imagenet"
    spec = _BackboneSpec.of(name)
    build = _build_resnet if family.name == "resnet" else _build_vgg
    backbone = build(name, spec, in_channels, small_input, pretrained)
    # Exact, and free where every tap is live; at 32 px with the standard ResNet stem it halves
    # a CPU train step (layer4's 3x3 convs see 1x1 maps).
    skip_dead_taps(backbone.body)
    return backbone


def _build_resnet(
    name: str, spec: _BackboneSpec, in_channels: int, small_input: bool, pretrained: bool
) -> Backbone:
    body = _load_pretrained(name, spec) if pretrained else spec.builder(weights=None)
    out_features = body.fc.in_features
    body.fc = nn.Identity()
    if small_input:
        # The ImageNet stem (7x7 stride-2 conv + stride-2 max-pool) shrinks a 28 px image to 7 px
        # before layer1; CIFAR-style ResNets use a 3x3 stride-1 conv and no pool instead.
        if pretrained:
            logger.warning(
                "%s: small_input replaces the pretrained 7x7 stride-2 stem conv with a freshly "
                "initialised 3x3 stride-1 conv; every other layer keeps its ImageNet weights.",
                name,
            )
        stem = nn.Conv2d(in_channels, body.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        _init_conv(stem)
        body.conv1 = stem
        body.maxpool = nn.Identity()
    else:
        body.conv1 = _adapt_input_conv(body.conv1, in_channels, pretrained=pretrained)
    return Backbone(name, body, out_features, min_input_size(name, small_input))


def _build_vgg(
    name: str, spec: _BackboneSpec, in_channels: int, small_input: bool, pretrained: bool
) -> Backbone:
    if pretrained:
        body = _load_pretrained(name, spec)
    else:
        # The dropped classifier holds ~120M parameters (a 25088x4096 Linear); building it on the
        # meta device skips allocating and initialising it (1-3 s and ~0.5 GB per build on CPU).
        with torch.device("meta"):
            body = spec.builder(weights=None)
    # Drop the 4096-wide classifier: features + 1x1 adaptive average pool give a 512-d vector
    # at any input size.
    body.avgpool = nn.AdaptiveAvgPool2d(1)
    body.classifier = nn.Identity()
    if not pretrained:
        body.to_empty(device=torch.get_default_device())
        _init_vgg_features(body.features)

    features: nn.Sequential = body.features
    pool_indices = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    if small_input:
        # Five 2x2 pools take 28 px to 14, 7, 3, 1 and then fail. Dropping the last two keeps a
        # 3x3 map at 28 px for the deepest block. Identity keeps the layer indices, so the
        # state-dict keys (and pretrained conv weights) are unchanged.
        for i in pool_indices[-_VGG_SMALL_INPUT_DROPPED_POOLS:]:
            features[i] = nn.Identity()
        pool_indices = pool_indices[:-_VGG_SMALL_INPUT_DROPPED_POOLS]
    features[0] = _adapt_input_conv(features[0], in_channels, pretrained=pretrained)
    out_features = [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels
    minimum = min_input_size(name, small_input)
    assert 2 ** len(pool_indices) == minimum, (name, small_input, len(pool_indices), minimum)
    return Backbone(name, body, out_features, minimum)


def _init_conv(conv: nn.Conv2d) -> None:
    """Initialise a conv the way torchvision's ResNet and VGG do."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _init_vgg_features(features: nn.Module) -> None:
    """Re-create torchvision's VGG init on features materialised from the meta device."""
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            _init_conv(module)
        elif isinstance(module, nn.BatchNorm2d):
            # Also resets the running statistics, which to_empty left uninitialised.
            module.reset_parameters()


def _adapt_input_conv(conv: nn.Conv2d, in_channels: int, *, pretrained: bool) -> nn.Conv2d:
    """Return ``conv`` taking ``in_channels`` inputs (timm's ``adapt_input_conv``).

    Pretrained RGB filters are summed over the channel dim for grey input, which keeps each
    filter's response to a grey image equal to its response to that image copied into R, G and B.
    Other channel counts repeat the RGB filters and rescale by ``3 / in_channels``.
    """
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    if not pretrained:
        _init_conv(new)
        return new
    with torch.no_grad():
        weight = conv.weight  # (out, 3, kh, kw)
        if in_channels == 1:
            weight = weight.sum(dim=1, keepdim=True)  # (out, 1, kh, kw)
        else:
            repeats = math.ceil(in_channels / conv.in_channels)
            weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3 / in_channels)
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _load_pretrained(name: str, spec: _BackboneSpec) -> nn.Module:
    """Build the torchvision model with its DEFAULT weights, failing loudly if they are missing.

    The cache is checked first so that a missing file fails with a message naming the file and
    the cache directory, never with a silent random init.
    """
    weights = spec.weights.DEFAULT
    filename = os.path.basename(urlparse(weights.url).path)
    # torch.hub reads TORCH_HOME on every call, so this follows the environment at build time.
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    cached = checkpoints / filename

    def fail(reason: str) -> DtlrayError:
        return DtlrayError(
            f"Could not load the ImageNet weights for backbone {name!r} ({filename}): {reason}. "
            f"torch looks for them in {checkpoints} (torch.hub.get_dir()/checkpoints, set by "
            "TORCH_HOME). Fix: run once with internet access so torchvision downloads them, or "
            f"copy {filename} (from {weights.url}) into {checkpoints}, or set `weights: null` "
            "to train from random init."
        )

    if not cached.is_file():
        if _offline():
            raise fail(f"the file is not in the cache and {OFFLINE_ENV} forbids downloading it")
        logger.info("Downloading %s to %s", weights.url, cached)
        match = torch.hub.HASH_REGEX.search(filename)
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
            # Writes to a temporary file and renames it, so concurrent workers never read a
            # half-written file.
            torch.hub.download_url_to_file(
                weights.url,
                str(cached),
                hash_prefix=match.group(1) if match else None,
                progress=False,
            )
        except (URLError, OSError) as exc:  # no network, DNS, HTTP error, timeout, disk
            raise fail(f"it is not in the cache and downloading it failed ({exc})") from exc
        except RuntimeError as exc:  # download_url_to_file's SHA-256 prefix check
            raise fail(f"the download was corrupt ({exc})") from exc
    try:
        return spec.builder(weights=weights, progress=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # corrupt/foreign file
        raise fail(
            f"the cached file {cached} could not be read ({exc}); delete it so it is downloaded "
            "again"
        ) from exc
