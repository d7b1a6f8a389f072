"""Search-space YAML -> validated :class:`SearchSpace` -> Tune/Optuna domains.

A space file names the fixed trial settings (``trial:``, any :class:`~dtlray.config.TrialConfig`
field, nested), the searched parameters (``search:``, dotted config keys with a distribution),
the searcher, the scheduler, the objective and the budget. Everything is checked when the file is
loaded, without starting Ray: unknown keys, bad bounds, values the config would reject (an
unknown backbone among the choices, a learning rate out of range) all fail here with the key and
the fix.

Example::

    trial:
      data: {source: fashion-mnist, targets: [digits, faces], image_size: 28, channels: 1}
      stage2: {epochs: 4}
    search:
      model.backbone: {choices: [resnet18, vgg11_bn]}
      model.fusion_depth: {type: int, low: 0, high: 2}      # Optuna-style: high is inclusive
      stage2.lr: {type: float, low: 0.001, high: 0.1, log: true}
    searcher: {type: optuna, seed: 0}
    scheduler: {type: asha, grace_period: 2}
    objective: {metric: target/val_acc, mode: max}
    num_samples: 8
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dtlray.config import TrialConfig, format_validation_error, valid_keys, whole_as_int
from dtlray.errors import DtlrayError

if TYPE_CHECKING:
    import optuna


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Strict):
    """A float in ``[low, high]``, log-uniform when ``log``."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    default: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        if not self.low < self.high:
            raise ValueError(f"low < high must hold, but got (low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, but got low={self.low}")
        return self

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]

    def center(self) -> float:
        if self.log:
            return math.sqrt(self.low * self.high)
        return (self.low + self.high) / 2

    def contains(self, value: Any) -> bool:
        return isinstance(value, int | float) and self.low <= value <= self.high


class IntParam(_Strict):
    """An int in ``[low, high]`` — both inclusive, as in Optuna."""

    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False
    default: int | None = None

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        if not self.low <= self.high:
            raise ValueError(f"low <= high must hold, but got (low={self.low}, high={self.high})")
        if self.log and self.low < 1:
            raise ValueError(f"log=true needs low >= 1, but got low={self.low}")
        return self

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]

    def center(self) -> int:
        return (self.low + self.high) // 2

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high


class CategoricalParam(_Strict):
    """One of ``choices``."""

    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)
    default: Any = None

    @model_validator(mode="after")
    def _unique(self) -> CategoricalParam:
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices must be unique, got {self.choices}")
        return self

    def values_to_check(self) -> list[Any]:
        return list(self.choices)

    def center(self) -> Any:
        return self.choices[0]

    def contains(self, value: Any) -> bool:
        return value in self.choices


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


TWO_AXIS_KEYS = ("stage1.epochs", "stage2.epochs")  # what the two-axis searcher sets per trial


class SearcherConfig(_Strict):
    """How the next configuration is chosen."""

    type: Literal["optuna", "random"] = "optuna"
    seed: int = 0
    n_startup_trials: int = Field(
        default=4, ge=1, description="TPE: random trials before the model takes over."
    )
    start_from_default: bool = Field(
        default=True,
        description="The first trial is the space's default point (each searched key's "
        "default, else the trial config's value); false: every trial is the searcher's.",
    )


class SchedulerConfig(_Strict):
    """How trials are stopped early (over finetune epochs, and for ``two_axis`` also over
    stage-1 budgets: see :mod:`dtlray.two_axis`)."""

    type: Literal["asha", "fifo", "two_axis"] = "asha"
    grace_period: int | None = Field(
        default=None,
        ge=1,
        description="First rung in finetune epochs; default about a third of stage2.epochs "
        "(a first rung at 1 epoch cuts slow starters that would have won).",
    )
    reduction_factor: float = Field(default=2.0, gt=1.0)
    stage1_budgets: list[int | float] | None = Field(
        default=None,
        description="two_axis: the stage-1 budgets (stage1.epochs, fractions allowed: 0.25 is a "
        "quarter of an epoch), increasing; 1/reduction_factor of a budget's trials (on target val "
        "acc after a grace_period finetune), from its top 1/reduction_factor of stage-1 "
        "configurations (one promoted from keeps its place there), go on to the next.",
    )
    logme_quantile: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="The zero-cost pre-rank (dtlray.logme_rung): a trial whose stage-1 trunk's "
        "mean LogME on the targets' train splits is below this quantile of the stage-1 "
        "configurations scored so far stops at its first finetune result. Off by default: on the "
        "quickstart grid LogME ranks stage-1 configurations with Kendall tau +0.32 only.",
    )
    logme_min_configs: int = Field(
        default=4,
        ge=2,
        description="logme_quantile: distinct stage-1 configurations scored before it stops any.",
    )

    @field_validator("stage1_budgets", mode="after")
    @classmethod
    def _whole_budgets_as_int(cls, budgets: list[float] | None) -> list[float] | None:
        return None if budgets is None else [whole_as_int(b) for b in budgets]


class ObjectiveConfig(_Strict):
    """What the search optimises."""

    metric: str = "target/val_acc"
    mode: Literal["max", "min"] = "max"


class SearchSpace(_Strict):
    """A validated search space (see the module docstring for the file format)."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    trial: TrialConfig = TrialConfig()
    search: dict[str, Param] = Field(default_factory=dict)
    searcher: SearcherConfig = SearcherConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    num_samples: int = Field(default=8, ge=1, le=100_000)
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="None: as many as the cluster's CPUs/GPUs can run."
    )

    @model_validator(mode="after")
    def _check_search(self) -> SearchSpace:
        keys = set(valid_keys())
        for key, param in self.search.items():
            if key not in keys:
                raise ValueError(f"search.{key}: unknown config key; valid keys: {sorted(keys)}")
            for value in param.values_to_check():
                try:
                    TrialConfig.from_flat({key: value}, base=self.trial)
                except DtlrayError as err:
                    raise ValueError(
                        f"search.{key}: value {value!r} is not allowed: {err}"
                    ) from None
            if param.default is not None and not param.contains(param.default):
                raise ValueError(
                    f"search.{key}: default {param.default!r} is outside the distribution"
                )
        self._check_two_axis()
        if self.scheduler.logme_quantile is not None and self.scheduler.type == "two_axis":
            raise ValueError(
                "scheduler.logme_quantile does not combine with two_axis: its scores would pool "
                "stage-1 budgets, and it could stop a promoted configuration's full finetune"
            )
        if self.scheduler.logme_quantile is not None and not self.uses_stage1:
            raise ValueError(
                "scheduler.logme_quantile ranks stage-1 trunks, but every trial here has "
                "stage2.init: scratch (no stage 1); remove logme_quantile"
            )
        return self

    @property
    def uses_stage1(self) -> bool:
        """Some trial of the space starts its finetune from a stage 1 (so reads the source)."""
        init = self.search.get("stage2.init")
        if init is None:
            return self.trial.stage2.init != "scratch"
        return any(value != "scratch" for value in init.values_to_check())

    def _check_two_axis(self) -> None:
        budgets = self.scheduler.stage1_budgets
        if self.scheduler.type != "two_axis":
            if budgets is not None:
                raise ValueError("scheduler.stage1_budgets is for scheduler.type: two_axis only")
            return
        if budgets is None or len(budgets) < 2 or sorted(set(budgets)) != budgets:
            raise ValueError(
                "scheduler two_axis needs stage1_budgets: at least two increasing stage1.epochs "
                f"values (e.g. [0.25, 1, 2]), got {budgets}"
            )
        for key in TWO_AXIS_KEYS:
            if key in self.search:
                raise ValueError(f"search.{key}: scheduler two_axis sets it; do not search it")
        if self.trial.stage1.schedule != "wsd":
            raise ValueError(
                "scheduler two_axis needs trial.stage1.schedule: wsd (a promoted configuration "
                "continues the constant phase its shorter stage 1 stored)"
            )
        for budget in budgets:
            try:
                TrialConfig.from_flat({"stage1.epochs": budget}, base=self.trial)
            except DtlrayError as err:
                raise ValueError(
                    f"scheduler.stage1_budgets: {budget} is not allowed: {err}"
                ) from None

    @property
    def trial_keys(self) -> list[str]:
        """The config keys a trial's sampled values hold: the searched ones, and for
        ``two_axis`` the stage-1 budget and finetune epochs its searcher sets."""
        keys = list(self.search)
        if self.scheduler.type == "two_axis":
            keys += [k for k in TWO_AXIS_KEYS if k not in keys]
        return keys

    @property
    def grace_period(self) -> int:
        """ASHA's first rung, in finetune epochs."""
        epochs = self.max_epochs
        if self.scheduler.grace_period is not None:
            return min(self.scheduler.grace_period, epochs)
        return max(1, round(epochs / 3))

    @property
    def max_epochs(self) -> int:
        """The largest number of finetune epochs a trial can run (ASHA's max_t)."""
        param = self.search.get("stage2.epochs")
        if isinstance(param, IntParam):
            return param.high
        if isinstance(param, CategoricalParam):
            return max(int(c) for c in param.choices)
        return self.trial.stage2.epochs

    def default_values(self) -> dict[str, Any]:
        """A value for every searched key: its ``default``, else the fixed/config value when it
        lies in the distribution, else the distribution's centre."""
        fixed = self.trial.to_flat()
        values = {}
        for key, param in self.search.items():
            if param.default is not None:
                values[key] = param.default
            elif param.contains(fixed[key]):
                values[key] = fixed[key]
            else:
                values[key] = param.center()
        return values

    def dataset_names(self) -> set[str]:
        """Every dataset a trial of this space can read: the fixed ones and searched choices."""
        data = self.trial.data
        names = set(data.targets)
        if self.uses_stage1:
            names.add(data.source)
        for key in ("data.source", "data.targets"):
            param = self.search.get(key)
            if isinstance(param, CategoricalParam):
                for choice in param.choices:
                    names.update([choice] if isinstance(choice, str) else choice)
        return names

    def trial_config(self, sampled: Mapping[str, Any] | None = None) -> TrialConfig:
        """The trial for ``sampled`` values (defaults for any searched key not given)."""
        values = {**self.default_values(), **(sampled or {})}
        return TrialConfig.from_flat(values, base=self.trial)

    def sampled_trial_config(self, config: Mapping[str, Any]) -> TrialConfig:
        """The trial of a Tune config: its :attr:`trial_keys` values, anything else ignored."""
        return self.trial_config({k: v for k, v in config.items() if k in self.trial_keys})


class Stage1Keys:
    """The stage-1 key of a suggested config (None for a scratch trial); picklable, so a
    restored search keeps it."""

    def __init__(self, space: SearchSpace, source_fingerprint: str) -> None:
        self._space = space
        self._fingerprint = source_fingerprint

    def __call__(self, config: Mapping[str, Any]) -> str | None:
        cfg = self._space.sampled_trial_config(config)
        return None if cfg.stage2.init == "scratch" else cfg.stage1_key(self._fingerprint)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file.

    Raises:
        DtlrayError: the file is missing, not YAML, or not a valid space (names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise DtlrayError(f"search space {str(path)!r} not found; see search_spaces/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DtlrayError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raise DtlrayError(
            f"{path}: the file is empty; a search space needs at least a `trial:` section (fixed "
            "values) and a `search:` section (what to search) — see search_spaces/tiny.yaml"
        )
    return parse_space(raw, source=str(path))


def parse_space(raw: Mapping[str, Any], source: str = "<space>") -> SearchSpace:
    """Validate an already-loaded space mapping (see :func:`load_space`)."""
    if not isinstance(raw, Mapping):
        raise DtlrayError(f"{source}: a search space is a mapping of sections, got {type(raw)}")
    raw = dict(raw)
    search = raw.get("search") or {}
    if isinstance(search, Mapping):
        # A bare {choices: [...]} is categorical; the type key is optional there.
        raw["search"] = {
            key: ({"type": "categorical", **spec} if _is_bare_choices(spec) else spec)
            for key, spec in search.items()
        }
    raw.setdefault("name", Path(source).stem if source.endswith((".yaml", ".yml")) else None)
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise DtlrayError(f"{source}: {format_validation_error(err)}") from None


def check_searchable(space: SearchSpace, source: str = "the space") -> None:
    """Refuse a space that searches nothing: every trial would run the same configuration.

    ``dtlray check`` and ``dtlray tune`` apply it; ``dtlray train`` runs fixed values and does not.

    Raises:
        DtlrayError: no ``search:`` entries (says how to add one, or to use ``dtlray train``).
    """
    if not space.search:
        raise DtlrayError(
            f"{source}: nothing is searched (no `search:` section, or an empty one), so every "
            "trial would train the same configuration; add parameters under `search:`, e.g. "
            "`stage2.lr: {type: float, low: 0.001, high: 0.1, log: true}` (see "
            "search_spaces/tiny.yaml), or run one fixed trial with `dtlray train`"
        )


def _is_bare_choices(spec: Any) -> bool:
    return isinstance(spec, Mapping) and "choices" in spec and "type" not in spec


def to_optuna_distributions(
    space: SearchSpace,
) -> dict[str, optuna.distributions.BaseDistribution]:
    """The searched parameters as Optuna distributions (int ``high`` inclusive on both sides)."""
    import optuna  # only the search and reports need it; `dtlray check` stays light

    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, param in space.search.items():
        if isinstance(param, FloatParam):
            out[key] = optuna.distributions.FloatDistribution(param.low, param.high, log=param.log)
        elif isinstance(param, IntParam):
            out[key] = optuna.distributions.IntDistribution(param.low, param.high, log=param.log)
        elif isinstance(param, CategoricalParam):
            out[key] = optuna.distributions.CategoricalDistribution(param.choices)
    return out
