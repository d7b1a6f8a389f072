"""Models: backbone registry, residual feature fusion, multi-task heads. No Ray in here.

The registry's names and limits (:mod:`dtlray.models.registry`) import without torch, so config
validation stays quick; the modules, which need torch and torchvision, load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dtlray.models.registry import (
    backbone_family,
    default_small_input,
    head_name_problem,
    list_backbones,
    min_input_size,
)

if TYPE_CHECKING:
    from dtlray.models.backbones import Backbone, build_backbone
    from dtlray.models.fusion import FeatureFusion
    from dtlray.models.transfer import TransferModel, build_transfer_model, load_trunk

# name -> module, imported on first use (torch and torchvision take seconds to import)
_LAZY = {
    "Backbone": "dtlray.models.backbones",
    "build_backbone": "dtlray.models.backbones",
    "FeatureFusion": "dtlray.models.fusion",
    "TransferModel": "dtlray.models.transfer",
    "build_transfer_model": "dtlray.models.transfer",
    "load_trunk": "dtlray.models.transfer",
}

__all__ = [
    "Backbone",
    "FeatureFusion",
    "TransferModel",
    "backbone_family",
    "build_backbone",
    "build_transfer_model",
    "default_small_input",
    "head_name_problem",
    "list_backbones",
    "load_trunk",
    "min_input_size",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
