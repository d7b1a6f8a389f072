"""dtlray: search deep transfer-learning pipelines at cluster scale on Ray."""

from __future__ import annotations

__version__ = "0.1.0"
