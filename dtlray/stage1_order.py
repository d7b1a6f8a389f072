"""Stage-1-aware trial order: no slot waits for a stage 1 another trial is computing.

Of the trials that need one stage-1 result, the first computes it and the others wait for it
(single-flight, :mod:`dtlray.stage1_claims`) -- holding a slot that does nothing meanwhile. In
a search with a few stage-1 configurations and many finetune settings, those waits add up.

:class:`Stage1OrderedSearch` wraps the searcher and reorders its suggestions instead: a
suggestion whose stage 1 is being computed by a running trial is held back, and the searcher is
asked for the next one, which runs now. A held suggestion goes out as soon as its stage 1 is
stored (the trial computing it reported its first finetune epoch), before any new one. The
searcher is never asked for more suggestions than the search has trials left, so every
suggestion it makes runs; when every remaining one would wait, the oldest held one goes out and
waits, exactly as it would have without reordering.

Part of the search layer (:mod:`dtlray.search` builds it around the Optuna searcher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher

from dtlray.searcher_wrapper import SearcherWrapper


@dataclass
class _Held:
    inner_id: str  # the id the inner searcher knows the suggestion by
    config: dict[str, Any]
    key: str | None  # its stage-1 key (None: it needs no stage 1)


class Stage1OrderedSearch(SearcherWrapper):
    """A searcher whose suggestions never wait on a stage 1 that a running trial computes.

    Args:
        searcher: the searcher to reorder (dtlray's Optuna searcher).
        stage1_key: the stage-1 key of a suggested config (None when it needs none).
        is_stored: whether the stage-1 result with a key is stored already.
        num_samples: the search's trials: the searcher is asked for at most this many.
    """

    def __init__(
        self,
        searcher: Searcher,
        *,
        stage1_key: Callable[[dict[str, Any]], str | None],
        is_stored: Callable[[str], bool],
        num_samples: int,
    ) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self._stage1_key = stage1_key
        self._is_stored = is_stored
        self._num_samples = num_samples
        self._asked = 0  # suggestions made by the inner searcher
        self._held: list[_Held] = []
        self._inner_ids: dict[str, str] = {}  # Tune trial id -> inner id
        self._computing: dict[str, str] = {}  # stage-1 key -> the trial computing it
        self.reordered = 0  # suggestions that went out later than they were made

    # -- Tune's calls --------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | None:  # noqa: D102
        for i, held in enumerate(self._held):
            if not self._would_wait(held.key):
                del self._held[i]
                return self._start(trial_id, held)
        asks = 0
        while self._asked < self._num_samples:
            # Tune asks once per trial id; a second ask in one call needs an id of its own.
            inner_id = trial_id if asks == 0 else f"{trial_id}~{asks}"
            asks += 1
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                break
            self._asked += 1
            suggestion = _Held(inner_id, config, self._stage1_key(config))
            if not self._would_wait(suggestion.key):
                return self._start(trial_id, suggestion)
            self._held.append(suggestion)
            self.reordered += 1
        if self._held:  # every remaining suggestion would wait: the oldest goes and waits
            return self._start(trial_id, self._held.pop(0))
        return Searcher.FINISHED if self._asked >= self._num_samples else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:  # noqa: D102
        # A finetune result means the trial's stage 1 is done (and stored).
        self._done_computing(trial_id)
        self.searcher.on_trial_result(self._inner_ids.get(trial_id, trial_id), result)

    def on_trial_complete(  # noqa: D102
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        self._done_computing(trial_id)
        inner_id = self._inner_ids.get(trial_id, trial_id)
        self.searcher.on_trial_complete(inner_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        self.searcher.add_evaluated_point(*args, **kwargs)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _would_wait(self, key: str | None) -> bool:
        """A trial with this stage-1 key would wait now: another running trial computes it."""
        return key is not None and key in self._computing and not self._is_stored(key)

    def _start(self, trial_id: str, suggestion: _Held) -> dict[str, Any]:
        self._inner_ids[trial_id] = suggestion.inner_id
        key = suggestion.key
        if key is not None and key not in self._computing and not self._is_stored(key):
            self._computing[key] = trial_id  # this trial claims and computes it
        return suggestion.config

    def _done_computing(self, trial_id: str) -> None:
        for key, holder in list(self._computing.items()):
            if holder == trial_id:
                del self._computing[key]
