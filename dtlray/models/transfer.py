"""The transfer model (backbone -> fusion -> one head per task) and stage-1 weight loading."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from dtlray.errors import DtlrayError
from dtlray.models.backbones import Backbone, build_backbone
from dtlray.models.fusion import FeatureFusion
from dtlray.models.registry import head_name_problem

__all__ = ["TransferModel", "build_transfer_model", "load_trunk"]

logger = logging.getLogger(__name__)

_HEADS_PREFIX = "heads."
_TRUNK_PREFIXES = ("backbone.", "fusion.")
# Added to every key by DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``)
# when a wrapped model's state dict is saved instead of the inner model's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class TransferModel(nn.Module):
    """Backbone, feature fusion and one linear classification head per task.

    Stage 1 has one head (the source task); stage 2 keeps the trunk (backbone + fusion) and
    replaces the heads with one fresh head per target task (:meth:`reset_heads`).

    Args:
        backbone: The feature extractor.
        fusion: The fusion module; its ``in_features`` must equal ``backbone.out_features``.
        heads: Task name -> number of classes. Names may contain ``-`` but not ``.``, and may
            not be an ``nn.ModuleDict`` attribute (see :func:`~dtlray.models.head_name_problem`).
        head_dropout: Dropout probability on the fused features before the heads, in ``[0, 1)``.

    Raises:
        DtlrayError: If a task name cannot name a head.
        ValueError: If the fusion does not fit the backbone, there is no head, a class count is
            < 1 or ``head_dropout`` is out of range.
    """

    def __init__(
        self,
        backbone: Backbone,
        fusion: FeatureFusion,
        heads: Mapping[str, int],
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if fusion.in_features != backbone.out_features:
            raise ValueError(
                f"fusion.in_features must equal backbone.out_features, but got "
                f"(fusion.in_features={fusion.in_features}, "
                f"backbone.out_features={backbone.out_features})"
            )
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), but got {head_dropout}")
        self.backbone = backbone
        self.fusion = fusion
        self.head_dropout = nn.Dropout(head_dropout)
        self.heads = self._build_heads(heads)

    @property
    def tasks(self) -> dict[str, int]:
        """Task name -> number of classes, in head order."""
        return {task: head.out_features for task, head in self.heads.items()}

    def _build_heads(self, heads: Mapping[str, int]) -> nn.ModuleDict:
        if not heads:
            raise ValueError("a TransferModel needs at least one head, but got none")
        # New heads go where the trunk already is (stage 2 resets them after a .to(device)).
        reference = next(self.backbone.parameters())
        modules = nn.ModuleDict()
        for task, num_classes in heads.items():
            _check_task_name(task, modules)
            if num_classes < 1:
                raise ValueError(f"task {task!r} needs >= 1 classes, but got {num_classes}")
            modules[task] = nn.Linear(
                self.fusion.out_features,
                num_classes,
                device=reference.device,
                dtype=reference.dtype,
            )
        return modules

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused features of a batch of images.

        Args:
            x: Images, shape ``(B, C, H, W)``.

        Returns:
            Features, shape ``(B, fusion.out_features)``.
        """
        # (B, C, H, W)
        x = self.backbone(x)  # (B, backbone.out_features)
        return self.fusion(x)  # (B, D)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every task for the whole batch.

        Args:
            x: Images, shape ``(B, C, H, W)``.

        Returns:
            Task name -> logits of shape ``(B, num_classes)``.
        """
        # (B, C, H, W)
        features = self.head_dropout(self.features(x))  # (B, D), computed once for all heads
        # Every head sees the whole batch, even for tasks with no sample in it: the heads are
        # tiny, and keeping every parameter in the graph each step is what DDP requires (else it
        # needs find_unused_parameters=True, an extra graph walk per step). The loss must still
        # touch every head's logits (e.g. a masked sum), or DDP sees the head as unused.
        return {task: head(features) for task, head in self.heads.items()}  # {task: (B, n_task)}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for per-group learning rates (tllib's ``get_parameters``).

        Returns:
            ``{"backbone": [...], "fusion": [...], "heads": [...]}``, a partition of
            ``self.parameters()``; ``"fusion"`` is empty at fusion depth 0.
        """
        return {
            "backbone": list(self.backbone.parameters()),
            "fusion": list(self.fusion.parameters()),
            "heads": list(self.heads.parameters()),
        }

    def reset_heads(self, heads: Mapping[str, int]) -> None:
        """Replace all heads with freshly initialised ones (the start of stage 2).

        Call it before wrapping the model in DDP or building the optimiser: both hold on to the
        old parameters.

        Args:
            heads: Task name -> number of classes.

        Raises:
            DtlrayError: If a task name cannot name a head.
            ValueError: If there is no head or a class count is < 1.
        """
        self.heads = self._build_heads(heads)

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone and fusion part of :meth:`state_dict`, carried from stage 1 to stage 2.

        Returns:
            State-dict entries (parameters and BN buffers) whose keys start with ``backbone.`` or
            ``fusion.``.
        """
        return {k: v for k, v in self.state_dict().items() if k.startswith(_TRUNK_PREFIXES)}


def _check_task_name(task: object, heads: nn.ModuleDict) -> None:
    # The rule TrialConfig already applied to the dataset names; hasattr also catches an
    # attribute that a newer torch added to ModuleDict.
    problem = head_name_problem(task)
    if problem is None and isinstance(task, str) and hasattr(heads, task):
        problem = f"{task!r} cannot name a classifier head: it is an attribute of nn.ModuleDict"
    if problem is not None:
        raise DtlrayError(
            f"{problem}. Rename the dataset (e.g. `dtlray data prepare --image-folder DIR "
            "--name NEW`) or the task in the search space."
        )


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k.removeprefix(prefix): v for k, v in out.items()}
    return out


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys)} in all)"


def load_trunk(model: TransferModel, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load stage-1 backbone and fusion weights into ``model``, leaving its heads as they are.

    The timm ``_builder.load_pretrained`` way: drop the old heads, load with ``strict=False``,
    log what is left out, and fail when the trunk does not fit exactly.

    Args:
        model: The stage-2 model (any heads).
        state_dict: A stage-1 ``state_dict()`` or :meth:`TransferModel.trunk_state_dict`; keys
            saved from a DDP or ``torch.compile`` wrapper (``module.``/``_orig_mod.``) are accepted.

    Raises:
        DtlrayError: If a backbone or fusion key is missing or unexpected, or a shape differs: the
            checkpoint was built with other backbone or fusion settings.
    """
    state_dict = _strip_wrapper_prefixes(state_dict)
    dropped_heads = sorted(k for k in state_dict if k.startswith(_HEADS_PREFIX))
    trunk = {k: v for k, v in state_dict.items() if not k.startswith(_HEADS_PREFIX)}
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(_TRUNK_PREFIXES)}

    missing = sorted(expected.keys() - trunk.keys())
    unexpected = sorted(k for k in trunk.keys() - expected.keys() if k.startswith(_TRUNK_PREFIXES))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(trunk[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected.keys() & trunk.keys()
        if trunk[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_summarise(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_summarise(mismatched)}")
        raise DtlrayError(
            "The stage-1 checkpoint does not fit this model's backbone/fusion (it was built with "
            f"another architecture): {'; '.join(problems)}. The backbone settings (backbone, "
            "small_input, channels) and fusion settings (fusion_depth, fusion_width) of stage 2 "
            "must match stage 1: fix the config or pretrain again."
        )

    ignored = sorted(trunk.keys() - expected.keys())
    if ignored:
        logger.warning("load_trunk: ignoring keys outside backbone/fusion/heads: %s", ignored)
        trunk = {k: v for k, v in trunk.items() if k in expected}
    result = model.load_state_dict(trunk, strict=False)
    logger.info(
        "load_trunk: loaded %d backbone/fusion entries; dropped stage-1 heads: %s; "
        "kept freshly initialised: %s",
        len(trunk),
        _summarise(dropped_heads) or "none",
        _summarise(sorted(result.missing_keys)) or "none",
    )


def build_transfer_model(
    *,
    backbone: str,
    in_channels: int,
    small_input: bool,
    weights: str | None,
    fusion_depth: int,
    fusion_width: int | None,
    heads: Mapping[str, int],
    head_dropout: float = 0.0,
    fusion_dropout: float = 0.0,
) -> TransferModel:
    """Build a :class:`TransferModel` from resolved settings (the one factory the loop calls).

    Args:
        backbone: A name from :func:`dtlray.models.list_backbones`.
        in_channels: Image channels.
        small_input: Use the small-input backbone variant (see :func:`build_backbone`).
        weights: ``None`` or ``"imagenet"``.
        fusion_depth: Residual fusion blocks (0 = identity).
        fusion_width: Fusion width; ``None`` keeps the backbone's width.
        heads: Task name -> number of classes.
        head_dropout: Dropout before the heads.
        fusion_dropout: Dropout inside each fusion block.

    Returns:
        The model, in training mode, on torch's default device.

    Raises:
        DtlrayError: See :func:`build_backbone` and :class:`TransferModel`.
        ValueError: See :class:`FeatureFusion` and :class:`TransferModel`.
    """
    net = build_backbone(
        backbone, in_channels=in_channels, small_input=small_input, weights=weights
    )
    fusion = FeatureFusion(
        net.out_features, depth=fusion_depth, width=fusion_width, dropout=fusion_dropout
    )
    return TransferModel(net, fusion, heads, head_dropout=head_dropout)
