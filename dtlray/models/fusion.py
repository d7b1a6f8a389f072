"""Residual feature-fusion module between the backbone's pooled features and the task heads."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureFusion"]


class _ResidualBlock(nn.Module):
    """``relu(x + f(x))`` with ``f = Linear -> BN -> ReLU -> Dropout -> Linear -> BN``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        # No Linear bias: the BatchNorm right after it subtracts the mean and adds its own bias.
        self.fc1 = nn.Linear(width, width, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        # ResNet "zero-gamma" trick (Goyal et al. 2017, torchvision's zero_init_residual): the
        # branch's last BN starts at scale 0, so f(x) = 0 and the block starts as identity on the
        # non-negative features a ReLU backbone produces. Stacking blocks then cannot disturb the
        # (possibly pretrained) features at the start of training; the gradient reaches bn2 at
        # once and the rest of the branch from the first step on.
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, W)
        h = torch.relu(self.bn1(self.fc1(x)))  # (B, W)
        h = self.bn2(self.fc2(self.drop(h)))  # (B, W)
        return self.relu(x + h)  # (B, W)


class FeatureFusion(nn.Module):
    """A stack of residual MLP blocks over the backbone's pooled features.

    Depth 0 is the identity (no parameters, ``out_features == in_features``), so a search over
    the fusion depth includes "no fusion".

    Args:
        in_features: Width of the backbone features.
        depth: Number of residual blocks, >= 0.
        width: Width of the blocks; ``None`` means ``in_features``. A different width adds a
            Linear input projection. Ignored at depth 0.
        dropout: Dropout probability inside each block's branch, in ``[0, 1)``.

    Attributes:
        out_features: Width of the output, ``in_features`` at depth 0, else ``width``.

    Raises:
        ValueError: If a size is out of range (the config validates user input earlier; this
            guards the invariant).
    """

    def __init__(
        self, in_features: int, depth: int, width: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, but got {in_features}")
        if depth < 0:
            raise ValueError(f"fusion depth must be >= 0, but got {depth}")
        if width is not None and width < 1:
            raise ValueError(f"fusion width must be >= 1 (or None), but got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fusion dropout must be in [0, 1), but got {dropout}")
        width = in_features if width is None or depth == 0 else width
        self.in_features = in_features
        self.depth = depth
        self.out_features = width
        self.proj: nn.Module = (
            nn.Linear(in_features, width) if width != in_features else nn.Identity()
        )
        self.blocks = nn.Sequential(*(_ResidualBlock(width, dropout) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fuse features.

        Args:
            x: Backbone features, shape ``(B, in_features)``.

        Returns:
            Fused features, shape ``(B, out_features)``; ``x`` itself at depth 0.
        """
        # (B, in_features)
        x = self.proj(x)  # (B, out_features)
        return self.blocks(x)  # (B, out_features); an empty Sequential returns x unchanged
