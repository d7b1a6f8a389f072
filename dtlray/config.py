"""Typed trial configuration: the only place defaults live.

One :class:`TrialConfig` describes one trial end to end: the data, the model, both stages, the
resources and the seed. It is validated when it is built; a bad value raises
:class:`~dtlray.errors.DtlrayError` naming the field, the value and the fix. It converts to and
from the flat ``{"section.field": value}`` dict a search samples, and to a plain nested dict for
Ray workers (which rebuild the typed object on their first line).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtlray.errors import DtlrayError

# The torch-free registry: validating a config never imports torch (dtlray check stays quick).
from dtlray.models.registry import (
    default_small_input,
    head_name_problem,
    list_backbones,
    min_input_size,
)


class _Section(BaseModel):
    # Frozen and strict about keys: a typo in a YAML file or a --set must fail, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which prepared datasets a trial reads and at what size the model sees them."""

    root: str | None = Field(
        default=None, description="Data root; None means $DTLRAY_DATA or ~/.cache/dtlray/data."
    )
    source: str = Field(default="fashion-mnist", description="Stage-1 dataset name.")
    targets: tuple[str, ...] = Field(
        default=("digits", "faces"), description="Stage-2 dataset names, one task each."
    )
    image_size: int = Field(default=32, ge=8, le=512, description="Model input size (pixels).")
    channels: Literal[1, 3] = Field(default=3, description="Model input channels.")
    source_max_rows: int | None = Field(
        default=None, ge=1, description="Use only the first N source train rows (quick runs)."
    )
    source_val_max_rows: int | None = Field(
        default=None,
        ge=1,
        description="Validate stage 1 on only the first N source val rows (the splits are "
        "stored shuffled, so a random subset). Stage 1 validates every epoch, a forward pass a "
        "row: on a short stage 1 a large source val split costs as much as the training. It "
        "changes no weights, so it is not part of the stage-1 key: a stored stage 1 keeps the "
        "source metrics it was validated with.",
    )
    in_memory_max_mb: int = Field(
        default=2048,
        ge=0,
        description="A train shard up to this size (MB per worker, of the rows the trial trains "
        "on: the source's first source_max_rows, a target's label budget) is decoded once and "
        "kept in memory; a larger one streams from Ray Data every epoch. This holds for the "
        "source and for every target alike, and held and streamed tasks mix in one stage; 0 "
        "streams them all.",
    )

    @field_validator("source")
    @classmethod
    def _source_names_a_head(cls, source: str) -> str:
        _check_head_name(source)
        return source

    @field_validator("targets")
    @classmethod
    def _targets_unique(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if not targets:
            raise ValueError("needs at least one target dataset, e.g. targets: [digits]")
        if len(set(targets)) != len(targets):
            raise ValueError(f"lists a dataset twice: {list(targets)}; each target is one task")
        for target in targets:
            _check_head_name(target)
        return targets


def _check_head_name(dataset: str) -> None:
    # Each dataset gets a classifier head named after it (the source in stage 1, every target in
    # stage 2); fail here rather than when the model is built on a worker.
    problem = head_name_problem(dataset)
    if problem is not None:
        raise ValueError(
            f"dataset {problem}; prepare it under another name (`dtlray data prepare "
            "--image-folder DIR --name NEW`, letters, digits, '_' and '-') and use that"
        )


class ModelConfig(_Section):
    """The transfer model: backbone, fusion module and heads."""

    backbone: str = "resnet18"
    weights: Literal["imagenet"] | None = Field(
        default=None, description="None: random init; imagenet: torchvision's weights."
    )
    small_input: bool | Literal["auto"] = Field(
        default="auto", description="Small-input stem; auto: on below 64 px."
    )
    fusion_depth: int = Field(default=1, ge=0, le=16)
    fusion_width: int | None = Field(default=None, ge=1, le=8192)
    fusion_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    head_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        valid = list_backbones()
        if name not in valid:
            raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(valid)}")
        return name


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def whole_as_int(value: float) -> float:
    """``2.0`` as ``2``: one stage-1 budget, one cache key, whichever way it was written."""
    return int(value) if float(value).is_integer() else value


class StageConfig(_Section):
    """Optimiser settings shared by both stages (SGD with Nesterov momentum)."""

    epochs: int = Field(default=2, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=2, le=65_536, description="Per worker.")
    lr: float = Field(default=0.05, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "wsd", "constant", "step"] = "cosine"
    step_epochs: int = Field(default=1, ge=1, description="For schedule: step.")
    step_gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="For schedule: step.")
    warmup_epochs: int = Field(
        default=0,
        ge=0,
        description="For schedule: wsd: first epochs whose learning rate rises linearly to lr "
        "(part of the constant phase that longer budgets share).",
    )
    decay_fraction: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="For schedule: wsd (warmup-stable-decay): the share of the steps (at least "
        "one) over which the learning rate decays linearly to 0, step by step; before it, it "
        "stays constant.",
    )
    augment: bool = Field(
        default=False,
        description="Per-sample random translation by up to 1/8 of the image side "
        "(reflection-padded) and a random horizontal flip.",
    )

    def wsd_steps(self, steps_per_epoch: int) -> tuple[int, int, int]:
        """For ``wsd``: ``(warmup, constant, total)`` optimizer steps of a stage whose epochs take
        ``steps_per_epoch`` steps. The stage trains ``round(epochs * steps_per_epoch)`` steps (at
        least one); the last ``decay_fraction`` of them (at least one) decay, and the warmup
        steps are the first of the constant ones, which a longer budget shares."""
        total = max(1, _round_half_up(self.epochs * steps_per_epoch))
        decay = min(total, max(1, _round_half_up(total * self.decay_fraction)))
        constant = total - decay
        return min(constant, _round_half_up(self.warmup_epochs * steps_per_epoch)), constant, total

    @property
    def constant_epochs(self) -> float:
        """``wsd``: the epochs before the decay, at a constant rate, which a longer run with the
        same settings starts with (to within a step's rounding: :meth:`wsd_steps` is exact);
        0 for the other schedules."""
        return self.epochs * (1.0 - self.decay_fraction) if self.schedule == "wsd" else 0.0

    @field_validator("epochs", mode="after")
    @classmethod
    def _whole_as_int(cls, epochs: float) -> float:
        return whole_as_int(epochs)

    @model_validator(mode="after")
    def _warmup_fits(self) -> StageConfig:
        if self.schedule == "wsd" and self.warmup_epochs > self.constant_epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} does not fit before the decay: {self.epochs} "
                f"epochs with decay_fraction={self.decay_fraction} leave {self.constant_epochs:g} "
                "constant epoch(s); lower warmup_epochs or decay_fraction, or raise epochs"
            )
        if not isinstance(self.epochs, int) and self.schedule != "wsd":
            raise ValueError(
                f"epochs={self.epochs} is not a whole number: only schedule: wsd steps its "
                "learning rate per step, so only it can end mid-epoch"
            )
        return self

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> StageConfig:
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=true needs momentum > 0; set momentum (e.g. 0.9)")
        return self


class PretrainConfig(StageConfig):
    """Stage 1: pretrain backbone, fusion and the source head on the source dataset."""

    epochs: int | float = Field(
        default=2,
        gt=0,
        le=10_000,
        description="With schedule: wsd a fraction is allowed (e.g. 0.25: a quarter of an "
        "epoch, the short budget of a two-axis search).",
    )


class FinetuneConfig(StageConfig):
    """Stage 2: finetune on the targets, one fresh head per target."""

    epochs: int = Field(default=3, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=2, le=65_536, description="Per worker, all tasks.")
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    schedule: Literal["cosine", "constant", "step"] = "constant"
    init: Literal["stage1", "scratch"] = Field(
        default="stage1", description="stage1: start from stage 1; scratch: the baseline."
    )
    lr_mult_backbone: float = Field(default=1.0, ge=0.0, le=100.0)
    lr_mult_fusion: float = Field(default=1.0, ge=0.0, le=100.0)
    lr_mult_heads: float = Field(default=1.0, ge=0.0, le=100.0)
    freeze_backbone_epochs: int = Field(default=0, ge=0)
    samples_per_class: int | None = Field(
        default=None, ge=1, description="Label budget: at most N train images per class."
    )
    train_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Label budget: this fraction of train."
    )

    @model_validator(mode="after")
    def _one_budget(self) -> FinetuneConfig:
        if self.samples_per_class is not None and self.train_fraction is not None:
            raise ValueError(
                "set either samples_per_class or train_fraction as the label budget, not both"
            )
        if self.freeze_backbone_epochs > self.epochs:
            raise ValueError(
                f"freeze_backbone_epochs={self.freeze_backbone_epochs} exceeds "
                f"epochs={self.epochs}; lower it or raise epochs"
            )
        return self

    def lr_mult(self, group: str) -> float:
        """The learning-rate multiplier of a parameter group (backbone, fusion or heads)."""
        return {
            "backbone": self.lr_mult_backbone,
            "fusion": self.lr_mult_fusion,
            "heads": self.lr_mult_heads,
        }[group]


class ResourcesConfig(_Section):
    """Ray Train resources of one trial."""

    num_workers: int = Field(default=1, ge=1, le=1024)
    use_gpu: bool | Literal["auto"] = Field(
        default="auto", description="auto: use GPUs when the cluster has them."
    )
    cpus_per_worker: float = Field(default=1.0, gt=0.0, le=256.0)
    max_failures: int = Field(
        default=1, ge=-1, description="Worker-group restarts from the last checkpoint (-1: ∞)."
    )
    checkpoint: Literal["auto", "every_epoch", "end"] = Field(
        default="auto",
        description="When a finetune epoch writes a checkpoint (model + optimizer): auto = at "
        "the last epoch, at the scheduler's rungs (where a stopped trial's last report is) and "
        "whenever a minute of training passed since the last one; every_epoch; end = the last "
        "epoch only. A restart resumes from the last one written.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Training precision: auto = bf16 autocast on a GPU that supports it, fp32 "
        "elsewhere; bf16 also runs on CPU; fp16 (GPU only) trains with a gradient scaler. "
        "Weights stay fp32 (checkpoints resume under any precision).",
    )
    channels_last: bool = Field(
        default=True,
        description="Weights and images in the channels_last (NHWC) layout, the fast path of "
        "oneDNN's and cuDNN's convolutions (on CPU too); false: PyTorch's default NCHW. "
        "Checkpoints resume in either layout.",
    )


class TrialConfig(_Section):
    """Everything one trial needs. Build with :meth:`from_dict` or :meth:`from_flat`."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stage1: PretrainConfig = PretrainConfig()
    stage2: FinetuneConfig = FinetuneConfig()
    resources: ResourcesConfig = ResourcesConfig()
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _image_fits_backbone(self) -> TrialConfig:
        minimum = min_input_size(self.model.backbone, self.small_input)
        if self.data.image_size < minimum:
            raise ValueError(
                f"data.image_size={self.data.image_size} is below the {minimum} px that backbone "
                f"{self.model.backbone!r} needs with small_input={self.small_input}; set "
                f"data.image_size >= {minimum}, or model.small_input: true (or auto)"
            )
        return self

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, nested: Mapping[str, Any]) -> TrialConfig:
        """Build from a nested dict (a YAML section, a worker's config).

        Raises:
            DtlrayError: one line per bad field, each naming the field and the fix.
        """
        try:
            return cls.model_validate(dict(nested))
        except ValidationError as err:
            raise DtlrayError(format_validation_error(err)) from None

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: TrialConfig | None = None) -> TrialConfig:
        """Build from ``{"section.field": value}`` pairs over ``base`` (defaults if None).

        Raises:
            DtlrayError: an unknown key (with the valid ones) or a bad value.
        """
        nested = (base or cls()).to_dict()
        for key, value in flat.items():
            set_dotted(nested, key, value)
        return cls.from_dict(nested)

    # -- conversion ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain nested JSON-able dict (for workers, files and the stage-1 key)."""
        return self.model_dump(mode="json")

    def to_flat(self) -> dict[str, Any]:
        """Flat ``{"section.field": value}`` dict, the form a search samples."""
        flat: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    flat[f"{section}.{key}"] = value
            else:
                flat[section] = values
        return flat

    # -- derived values -----------------------------------------------------------------------

    @property
    def small_input(self) -> bool:
        """The resolved small-input choice (``auto`` decides by image size)."""
        if self.model.small_input == "auto":
            return default_small_input(self.data.image_size)
        return bool(self.model.small_input)

    def stage1_key(self, source_fingerprint: str) -> str:
        """Hash of everything that changes the stage-1 result.

        Stage 1 depends on the source data (its content fingerprint and the slice used), the
        input size, the model architecture, the pretrain optimiser settings and the seed — and on
        nothing in stage 2, so trials that differ only in finetune settings share it.
        """
        stage1 = self.stage1.model_dump(mode="json")
        if self.stage1.schedule != "wsd":
            for wsd_only in ("decay_fraction", "warmup_epochs"):
                stage1.pop(wsd_only)  # only wsd reads them: other keys stay as they were
        # wsd's version 2: its rate changes per step (version 1 changed it per epoch).
        return self._stage1_hash(
            source_fingerprint, 2 if self.stage1.schedule == "wsd" else 1, stage1
        )

    def stage1_tree_key(self, source_fingerprint: str) -> str | None:
        """Hash of what changes stage 1's constant phase (``schedule: wsd``), or None.

        The stage-1 key without the budget (``epochs``) and the decay: every budget of one
        configuration runs the same constant-learning-rate epochs before its own decay, so a
        longer budget can continue a shorter one's stored constant phase (the stage tree).
        """
        if self.stage1.schedule != "wsd":
            return None
        stage1 = self.stage1.model_dump(mode="json")
        for budget_only in ("epochs", "decay_fraction", "step_epochs", "step_gamma"):
            stage1.pop(budget_only)
        return self._stage1_hash(source_fingerprint, "tree-2", stage1)  # phases end at a step

    def _stage1_hash(self, source_fingerprint: str, version: Any, stage1: dict[str, Any]) -> str:
        part = {
            "version": version,
            "source": self.data.source,
            "source_fingerprint": source_fingerprint,
            "source_max_rows": self.data.source_max_rows,
            "image_size": self.data.image_size,
            "channels": self.data.channels,
            "model": {**self.model.model_dump(mode="json"), "small_input": self.small_input},
            "stage1": stage1,
            "seed": self.seed,
        }
        blob = json.dumps(part, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    """Set ``section.field`` in a nested config dict.

    Raises:
        DtlrayError: the key names no config field (the message lists the valid keys).
    """
    parts = key.split(".")
    node: Any = nested
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if not isinstance(node, dict) or part not in node:
            raise DtlrayError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
        if last:
            node[part] = value
        else:
            node = node[part]


def valid_keys() -> list[str]:
    """Every ``section.field`` key a TrialConfig accepts."""
    return sorted(TrialConfig().to_flat())


def format_validation_error(err: ValidationError) -> str:
    """Turn pydantic's error into lines of ``field: problem (got value)``."""
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            # Inside a search space the trial config sits under "trial."; its keys do not.
            section = ".".join(str(p) for p in item["loc"][:-1]).removeprefix("trial").lstrip(".")
            valid = [k for k in valid_keys() if k.startswith(f"{section}.")] if section else []
            message = "unknown key" + (f"; valid keys here: {', '.join(valid)}" if valid else "")
            lines.append(f"{field}: {message}")
            continue
        if not item["loc"] and item["type"] == "value_error":
            # A check across sections (TrialConfig's own validator) names its fields itself.
            lines.append(message)
            continue
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{field}: {message}{shown}")
    return "invalid config: " + "; ".join(lines)
