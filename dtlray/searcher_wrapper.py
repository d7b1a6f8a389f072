"""What a searcher that wraps another needs to be saved, restored and configured by Tune.

Tune saves a wrapper the way it saves its own ``ConcurrencyLimiter``: the wrapper's state by
``get_state`` (everything but the wrapped ``searcher``), the innermost searcher by ``save``.
"""

from __future__ import annotations

import copy
from typing import Any

from ray.tune.search import Searcher


class SearcherWrapper(Searcher):
    """A searcher around ``self.searcher`` (set by the subclass): Tune's save/restore and search
    properties go through to it."""

    searcher: Searcher

    def set_search_properties(  # noqa: D102
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def get_state(self) -> dict[str, Any]:  # noqa: D102
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:  # noqa: D102
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:  # noqa: D102
        self.searcher.restore(checkpoint_path)
