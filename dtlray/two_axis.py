"""The two-axis search: successive halving over stage-1 budgets, ASHA over finetune epochs.

Stage 1 is the expensive half of a trial, and ASHA alone prunes only the cheap finetune epochs:
every stage-1 configuration is pretrained to its full budget before any target signal exists.
Here the searcher samples new configurations at the smallest stage-1 budget with a short
finetune (ASHA's first rung), and promotes ``1 / reduction_factor`` of each budget's results to
the next budget -- asynchronously, as ASHA promotes: whenever a trial can start, the highest
budget with a configuration to promote that was not promoted yet gets it, else a new
configuration starts at the smallest budget.

What is promoted is chosen by stage-1 configuration first: a budget's best ``1 /
reduction_factor`` of its stage-1 configurations (at least one; each ranked by its best
trial), and of their trials the best, up to ``1 / reduction_factor`` of the budget's results.
Every configuration promoted into one stage-1 configuration shares its longer stage 1, and a
longer stage 1 is what costs: ranking trials alone promoted the best few wherever they were,
and each one in another stage-1 configuration paid a longer stage 1 of its own. For the same
reason a stage-1 configuration promoted from keeps its place in that top fraction: when the lead
passes to another one (results arrive one by one, and two configurations may be close), the
other is promoted from only when the top fraction grows to hold it.

The trial budget (``num_samples``) is shared with the promotions the running trials can still
earn: a new configuration starts only while it leaves room for them, else the slot waits for
those results (without that, a search that asks ahead -- :mod:`dtlray.stage1_order` does --
spent every trial on new configurations before the first result came in, and promoted none). A
promoted configuration's stage 1 continues the constant phase its shorter run stored
(``stage1.schedule: wsd``, the stage tree), so it trains only the extra epochs. The decision
uses what matters: the target validation accuracy of a finetune, never the source accuracy. Only
configurations at the largest budget finetune for the full ``stage2.epochs``, where Tune's ASHA
scheduler still stops poor ones early from the rung after the grace period on (they passed that
one at the smaller budget).

Part of the search layer (:mod:`dtlray.search` builds it around the Optuna searcher, which
proposes the new configurations and learns from their results at the smallest budget).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher

from dtlray.search_space import TWO_AXIS_KEYS
from dtlray.searcher_wrapper import SearcherWrapper

STAGE1_BUDGET_KEY, FINETUNE_EPOCHS_KEY = TWO_AXIS_KEYS


class TwoAxisSearch(SearcherWrapper):
    """New configurations at the smallest stage-1 budget; the best fraction of each budget goes on.

    Args:
        searcher: proposes new configurations (without the two keys this class sets).
        budgets: the stage-1 budgets (``stage1.epochs``), increasing.
        reduction_factor: a budget's top ``1 / reduction_factor`` is promoted to the next.
        short_epochs: the finetune epochs of a trial below the largest budget.
        full_epochs: the finetune epochs at the largest budget.
        num_samples: the search's trials (new and promoted together).
        stage1_group: the stage-1 configuration of a proposed configuration, budget aside
            (None: it has no stage 1, and is a group of its own); default: each configuration
            is its own.
    """

    def __init__(
        self,
        searcher: Searcher,
        *,
        budgets: list[float],
        reduction_factor: float,
        short_epochs: int,
        full_epochs: int,
        num_samples: int,
        stage1_group: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        if len(budgets) < 2 or sorted(set(budgets)) != list(budgets):
            raise ValueError(f"budgets must be at least two increasing values, got {budgets}")
        self.searcher = searcher
        self._budgets = list(budgets)
        self._eta = reduction_factor
        self._short, self._full = short_epochs, full_epochs
        self._num_samples = num_samples
        self._stage1_group = stage1_group
        self._groups: dict[str, str] = {}  # configuration (as JSON) -> its stage-1 group
        self._started = 0
        # Per budget: configuration (as JSON) -> its value there; and those already promoted.
        self._rungs: list[dict[str, float]] = [{} for _ in budgets]
        self._promoted: list[set[str]] = [set() for _ in budgets]
        # trial id -> (configuration, budget index); the inner searcher proposed (and learns
        # from) the ones at index 0.
        self._trials: dict[str, tuple[str, int]] = {}
        self._ended: set[str] = set()  # trials that completed or failed
        self._lost: set[str] = set()  # trials that failed or diverged: they earn nothing

    def suggest(self, trial_id: str) -> dict[str, Any] | None:  # noqa: D102
        if self._started >= self._num_samples:
            return Searcher.FINISHED
        for level in reversed(range(len(self._budgets) - 1)):
            promote = self._promotable(level)
            if promote is not None:
                self._promoted[level].add(promote)
                return self._start(trial_id, promote, level + 1)
        if self._owed(new=1) > self._num_samples - self._started - 1 and self._can_earn():
            return None  # the rest is owed to promotions the running trials may earn: wait
        config = self.searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        return self._start(trial_id, json.dumps(config, sort_keys=True), 0)

    def _is_new(self, trial_id: str) -> bool:
        return trial_id in self._trials and self._trials[trial_id][1] == 0

    def on_trial_result(self, trial_id: str, result: dict) -> None:  # noqa: D102
        # A failed trial that runs again (``--resume`` retries errored trials) is live again.
        self._ended.discard(trial_id)
        self._lost.discard(trial_id)
        if self._is_new(trial_id):
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(  # noqa: D102
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if self._is_new(trial_id):
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
        if trial_id not in self._trials:
            return
        self._ended.add(trial_id)
        config, level = self._trials[trial_id]
        value = None if error or not result else result.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            self._lost.add(trial_id)  # failed or diverged: never promoted
            return
        sign = 1.0 if self.mode == "max" else -1.0
        self._rungs[level][config] = sign * float(value)

    def set_state(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().set_state(state)
        # A search saved before the trial budget was shared with the promotions owed: what ran
        # is over (a trial Tune runs again is live again at its first result), and what has
        # no rung value earned nothing.
        if "_ended" not in state:
            self._ended = set(self._trials)
            self._lost = {
                trial_id
                for trial_id, (config, level) in self._trials.items()
                if config not in self._rungs[level]
            }

    # -- the rungs -----------------------------------------------------------------------------

    def _promotable(self, level: int) -> str | None:
        """The best configuration to promote from budget ``level`` not promoted yet, if any: of
        the trials of its top fraction of stage-1 configurations, the best, as many as its top
        fraction of results."""
        rung = self._rungs[level]
        top = math.floor(len(rung) / self._eta)
        if top == 0:
            return None
        ranked = sorted(rung, key=rung.__getitem__, reverse=True)
        groups = list(dict.fromkeys(map(self._group, ranked)))  # stage-1 configs, best first
        # Those promoted from already keep their place: their longer stage 1 is paid for, and
        # a new leader by a hair would pay another one (a lead that passes between two close
        # configurations, as results arrive, did so on a real search).
        paid = {self._group(c) for c in self._promoted[level]}
        kept = sorted(groups, key=lambda group: group not in paid)  # stable: paid ones first
        top_groups = set(kept[: max(1, math.floor(len(groups) / self._eta))])
        for config in [c for c in ranked if self._group(c) in top_groups][:top]:
            if config not in self._promoted[level]:
                return config
        return None

    def _group(self, config: str) -> str:
        """The stage-1 configuration of a configuration (as JSON), budget aside."""
        if config not in self._groups:
            group = self._stage1_group(json.loads(config)) if self._stage1_group else None
            self._groups[config] = config if group is None else group
        return self._groups[config]

    def _owed(self, new: int = 0) -> int:
        """About how many promotions are still to come if every live trial (and ``new`` more at
        the smallest budget) gets a result: per budget, the size of its top fraction less the
        promotions made from it, counting the promotions owed into it from below. (A promoted
        configuration that later drops out of the top fraction makes this an undercount.)"""
        counted = [0] * len(self._budgets)
        for trial_id, (_, level) in self._trials.items():
            counted[level] += trial_id not in self._lost
        counted[0] += new
        owed = carry = 0
        for level in range(len(self._budgets) - 1):
            live = counted[level] + carry
            carry = max(0, math.floor(live / self._eta) - len(self._promoted[level]))
            owed += carry
        return owed

    def _can_earn(self) -> bool:
        """A running trial below the largest budget may still earn a promotion."""
        top = len(self._budgets) - 1
        return any(
            level < top and trial_id not in self._ended
            for trial_id, (_, level) in self._trials.items()
        )

    def _start(self, trial_id: str, config: str, level: int) -> dict[str, Any]:
        self._started += 1
        self._trials[trial_id] = (config, level)
        last = level == len(self._budgets) - 1
        return {
            **json.loads(config),
            STAGE1_BUDGET_KEY: self._budgets[level],
            FINETUNE_EPOCHS_KEY: self._full if last else self._short,
        }
