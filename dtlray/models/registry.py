"""What the model part knows without importing torch: the backbone names and their input limits,
and which task names can name a head.

:mod:`dtlray.config` validates a trial with these before anything is built, so ``dtlray check``
and ``dtlray data`` never pay for importing torch; :mod:`dtlray.models.backbones` builds exactly
the names listed here (one list, not two) and :class:`~dtlray.models.TransferModel` applies the
same head-name rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dtlray.errors import DtlrayError

__all__ = [
    "SMALL_INPUT_BELOW_PX",
    "BackboneFamily",
    "backbone_family",
    "default_small_input",
    "head_name_problem",
    "list_backbones",
    "min_input_size",
]

FamilyName = Literal["resnet", "vgg"]

#: Images smaller than this (in px, the shorter side) get the small-input variant under ``auto``.
SMALL_INPUT_BELOW_PX = 64


@dataclass(frozen=True)
class BackboneFamily:
    """What the backbones of one family share.

    Attributes:
        name: ``"resnet"`` or ``"vgg"``.
        min_input_size: The smallest image side (px) the standard network runs on.
        min_input_size_small: The same with ``small_input`` on.
    """

    name: FamilyName
    min_input_size: int
    min_input_size_small: int


_FAMILIES: dict[FamilyName, BackboneFamily] = {
    # torchvision ResNets pad every strided layer and end in an adaptive pool: any size runs.
    "resnet": BackboneFamily("resnet", min_input_size=1, min_input_size_small=1),
    # VGG halves the image in each of its five 2x2 max-pools (32 px -> 1 px); small_input drops
    # the last two, leaving three (8 px -> 1 px).
    "vgg": BackboneFamily("vgg", min_input_size=32, min_input_size_small=8),
}

# The torchvision builder names dtlray accepts, with their family. The builders and weights are
# looked up by these names in torchvision's registry (dtlray.models.backbones).
_BACKBONES: dict[str, FamilyName] = {
    "vgg11": "vgg",
    "vgg11_bn": "vgg",
    "vgg13": "vgg",
    "vgg13_bn": "vgg",
    "vgg16": "vgg",
    "vgg16_bn": "vgg",
    "vgg19": "vgg",
    "vgg19_bn": "vgg",
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "resnet101": "resnet",
}

# Heads live in an nn.ModuleDict keyed by task name, and a key that is already an attribute of
# the ModuleDict is refused ("attribute 'keys' already exists"). These are its public attributes
# (tests/unit/test_models.py checks the list against the installed torch); the private ones start
# with "_", which no dataset name does.
_RESERVED_HEAD_NAMES = frozenset(
    {
        "T_destination",
        "add_module",
        "apply",
        "bfloat16",
        "buffers",
        "call_super_init",
        "children",
        "clear",
        "compile",
        "cpu",
        "cuda",
        "double",
        "dump_patches",
        "eval",
        "extra_repr",
        "float",
        "forward",
        "get_buffer",
        "get_extra_state",
        "get_parameter",
        "get_submodule",
        "half",
        "ipu",
        "items",
        "keys",
        "load_state_dict",
        "modules",
        "mtia",
        "named_buffers",
        "named_children",
        "named_modules",
        "named_parameters",
        "parameters",
        "pop",
        "register_backward_hook",
        "register_buffer",
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_module",
        "register_parameter",
        "register_state_dict_post_hook",
        "register_state_dict_pre_hook",
        "requires_grad_",
        "set_extra_state",
        "set_submodule",
        "share_memory",
        "state_dict",
        "to",
        "to_empty",
        "train",
        "training",
        "type",
        "update",
        "values",
        "xpu",
        "zero_grad",
    }
)


def list_backbones() -> list[str]:
    """Names accepted by :func:`dtlray.models.build_backbone`, sorted."""
    return sorted(_BACKBONES)


def backbone_family(name: str) -> BackboneFamily:
    """The family of a registry backbone.

    Args:
        name: A name from :func:`list_backbones`.

    Returns:
        Its :class:`BackboneFamily`.

    Raises:
        DtlrayError: If the name is unknown (the message lists the valid names).
    """
    family = _BACKBONES.get(name)
    if family is None:
        raise DtlrayError(
            f"Unknown backbone {name!r}: choose one of {', '.join(list_backbones())}."
        )
    return _FAMILIES[family]


def min_input_size(name: str, small_input: bool) -> int:
    """The smallest image side (px) backbone ``name`` runs on.

    Args:
        name: A name from :func:`list_backbones`.
        small_input: Whether the small-input variant is built.

    Returns:
        The minimum height and width in pixels.

    Raises:
        DtlrayError: If the name is unknown.
    """
    family = backbone_family(name)
    return family.min_input_size_small if small_input else family.min_input_size


def default_small_input(image_size: int) -> bool:
    """Whether ``small_input: auto`` should pick the small-input variant for this image size.

    Args:
        image_size: The shorter image side in pixels.

    Returns:
        True below 64 px, where the ImageNet stem (ResNet) or five pools (VGG) would shrink the
        image to nothing before the deep layers see it.
    """
    return image_size < SMALL_INPUT_BELOW_PX


def head_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a classifier head, or None when it can.

    Head names become ``nn.ModuleDict`` keys, attribute names and state-dict key segments, so
    they must be non-empty strings without ``'.'`` (the state-dict separator) that are not
    already an attribute of the ``ModuleDict`` (``keys``, ``train``, ``to``, ...).

    Args:
        name: A task (dataset) name.

    Returns:
        None if the name is usable, else a sentence saying what is wrong with it.
    """
    if not isinstance(name, str) or not name:
        return f"{name!r} cannot name a classifier head: a head name must be a non-empty string"
    if "." in name:
        return f"{name!r} cannot name a classifier head: head names cannot contain '.'"
    if name in _RESERVED_HEAD_NAMES:
        return (
            f"{name!r} cannot name a classifier head: it is reserved by torch's nn.ModuleDict "
            "(like keys, items, train, eval, to, cuda, float, type)"
        )
    return None
