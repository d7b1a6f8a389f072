"""dtlray: search deep transfer-learning pipelines at cluster scale on Ray.

The Python entry point is :func:`build_tuner`; everything else is reached through the CLI
(``dtlray --help``) or the modules (``dtlray.config``, ``dtlray.search_space``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["build_tuner", "load_space"]

if TYPE_CHECKING:
    from dtlray.search import build_tuner
    from dtlray.search_space import load_space


def __getattr__(name: str) -> Any:
    # Lazy: `import dtlray` (and `dtlray check`, `dtlray data`) should not pay for importing Ray.
    if name == "build_tuner":
        from dtlray.search import build_tuner

        return build_tuner
    if name == "load_space":
        from dtlray.search_space import load_space

        return load_space
    raise AttributeError(f"module 'dtlray' has no attribute {name!r}")
