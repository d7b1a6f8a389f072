"""Models: backbone registry, residual feature fusion, multi-task heads. No Ray in here."""

from __future__ import annotations

from dtlray.models.backbones import (
    Backbone,
    build_backbone,
    default_small_input,
    list_backbones,
)
from dtlray.models.fusion import FeatureFusion
from dtlray.models.transfer import TransferModel, build_transfer_model, load_trunk

__all__ = [
    "Backbone",
    "FeatureFusion",
    "TransferModel",
    "build_backbone",
    "build_transfer_model",
    "default_small_input",
    "list_backbones",
    "load_trunk",
]
