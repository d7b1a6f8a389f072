from __future__ import annotations

import pytest

from dtlray.config import TrialConfig, valid_keys
from dtlray.errors import DtlrayError


def test_defaults_are_the_documented_ones() -> None:
    cfg = TrialConfig()
    assert cfg.stage2.lr == 0.01
    assert cfg.stage2.schedule == "constant"
    assert cfg.stage1.nesterov and cfg.stage2.nesterov
    assert cfg.data.source == "fashion-mnist"
    assert cfg.data.targets == ("digits", "faces")


def test_flat_round_trip() -> None:
    cfg = TrialConfig.from_flat({"model.backbone": "vgg11_bn", "stage2.lr": 0.03, "seed": 7})
    flat = cfg.to_flat()
    assert flat["model.backbone"] == "vgg11_bn"
    assert flat["stage2.lr"] == 0.03
    assert flat["seed"] == 7
    assert TrialConfig.from_flat(flat) == cfg
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert set(flat) == set(valid_keys())


@pytest.mark.parametrize(
    ("flat", "expected"),
    [
        ({"model.backbone": "resnet9"}, "unknown backbone 'resnet9'; valid: "),
        ({"model.bakcbone": "resnet18"}, "unknown config key 'model.bakcbone'"),
        ({"stage2.lr": -1.0}, "stage2.lr: Input should be greater than 0"),
        ({"stage2.lr": "fast"}, "stage2.lr: Input should be a valid number"),
        ({"model.fusion_depth": -1}, "model.fusion_depth: Input should be greater than or equal"),
        ({"data.channels": 2}, "data.channels: Input should be 1 or 3"),
        ({"data.targets": []}, "needs at least one target dataset"),
        ({"data.targets": ["digits", "digits"]}, "lists a dataset twice"),
        ({"stage1.momentum": 0.0}, "nesterov=true needs momentum > 0"),
        (
            {"stage2.samples_per_class": 5, "stage2.train_fraction": 0.5},
            "set either samples_per_class or train_fraction",
        ),
        ({"stage2.freeze_backbone_epochs": 9}, "freeze_backbone_epochs=9 exceeds epochs=3"),
    ],
)
def test_bad_values_name_the_field_and_fix(flat: dict, expected: str) -> None:
    with pytest.raises(DtlrayError, match=None) as info:
        TrialConfig.from_flat(flat)
    assert expected in str(info.value)


def test_unknown_nested_key_lists_valid_keys_of_its_section() -> None:
    with pytest.raises(DtlrayError) as info:
        TrialConfig.from_dict({"stage2": {"learning_rate": 0.1}})
    message = str(info.value)
    assert "stage2.learning_rate: unknown key" in message
    assert "stage2.lr" in message


def test_stage1_key_ignores_stage2_and_tracks_stage1() -> None:
    base = TrialConfig()
    same = TrialConfig.from_flat({"stage2.lr": 0.05, "stage2.epochs": 9, "data.targets": ["faces"]})
    assert base.stage1_key("fp") == same.stage1_key("fp")
    assert base.stage1_key("fp") != base.stage1_key("other-fingerprint")
    for change in (
        {"stage1.lr": 0.01},
        {"model.fusion_depth": 2},
        {"model.backbone": "vgg11"},
        {"seed": 1},
        {"data.image_size": 48},
        {"data.source_max_rows": 100},
    ):
        assert TrialConfig.from_flat(change).stage1_key("fp") != base.stage1_key("fp"), change
    # Validating on fewer source rows changes no weights: the same stored stage 1.
    fewer = TrialConfig.from_flat({"data.source_val_max_rows": 100})
    assert fewer.stage1_key("fp") == base.stage1_key("fp")


def test_small_input_auto_follows_image_size() -> None:
    assert TrialConfig.from_flat({"data.image_size": 32}).small_input is True
    assert TrialConfig.from_flat({"data.image_size": 224}).small_input is False
    assert TrialConfig.from_flat({"model.small_input": False}).small_input is False
    # "auto" and its resolved value are the same stage-1 result.
    auto = TrialConfig.from_flat({"data.image_size": 32})
    explicit = TrialConfig.from_flat({"data.image_size": 32, "model.small_input": True})
    assert auto.stage1_key("fp") == explicit.stage1_key("fp")


@pytest.mark.parametrize(
    ("flat", "field", "value", "problem"),
    [
        ({"data.targets": ["digits", "mnist.v2"]}, "data.targets", "'mnist.v2'", "contain '.'"),
        ({"data.targets": ["train"]}, "data.targets", "'train'", "reserved by torch"),
        ({"data.source": "photos.2024"}, "data.source", "'photos.2024'", "contain '.'"),
        ({"data.source": "keys"}, "data.source", "'keys'", "reserved by torch"),
    ],
)
def test_dataset_names_that_cannot_name_a_head_fail_at_construction(
    flat: dict, field: str, value: str, problem: str
) -> None:
    with pytest.raises(DtlrayError) as info:
        TrialConfig.from_flat(flat)
    message = str(info.value)
    assert f"{field}: dataset {value} cannot name a classifier head" in message
    assert problem in message
    assert "--name NEW" in message  # the fix: prepare it under another name


def test_image_size_below_the_backbone_minimum_says_the_minimum_and_the_fix() -> None:
    with pytest.raises(DtlrayError) as info:
        TrialConfig.from_flat(
            {"model.backbone": "vgg11", "model.small_input": False, "data.image_size": 28}
        )
    message = str(info.value)
    assert "data.image_size=28 is below the 32 px that backbone 'vgg11' needs" in message
    assert "data.image_size >= 32" in message
    assert "model.small_input: true" in message


@pytest.mark.parametrize(
    "flat",
    [
        {"model.backbone": "vgg11", "model.small_input": False, "data.image_size": 32},
        {"model.backbone": "vgg11", "model.small_input": "auto", "data.image_size": 8},
        {"model.backbone": "resnet18", "model.small_input": False, "data.image_size": 8},
    ],
)
def test_image_sizes_the_backbone_takes_pass(flat: dict) -> None:
    TrialConfig.from_flat(flat)
