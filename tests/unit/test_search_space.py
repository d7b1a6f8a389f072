from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from dtlray.cli import main
from dtlray.errors import DtlrayError
from dtlray.search_space import load_space, parse_space, to_optuna_distributions

SPACES = sorted(Path("search_spaces").glob("*.yaml"))


def test_every_shipped_space_checks(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = {"tiny", "quickstart", "quickstart_asha", "default", "cross_domain"}
    assert {p.stem for p in SPACES} >= shipped
    assert main(["check", *map(str, SPACES)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(SPACES)


def test_check_does_not_import_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from dtlray.cli import main; main(['check', 'search_spaces/tiny.yaml']);"
        "sys.exit(1 if 'ray' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _space(**sections: object) -> dict:
    base = yaml.safe_load(Path("search_spaces/tiny.yaml").read_text())
    base.update(sections)
    return base


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"searcher": {"type": "hyperopt"}}, "searcher.type: Input should be 'optuna' or 'random'"),
        ({"scheduler": {"type": "asha", "grace": 2}}, "scheduler.grace: unknown key"),
        ({"num_samples": 0}, "num_samples: Input should be greater than or equal to 1"),
        ({"num_sample": 3}, "num_sample: unknown key"),
        ({"trial": {"stage2": {"learning_rate": 0.1}}}, "trial.stage2.learning_rate: unknown key"),
        ({"trial": {"stage2": {"lr": "fast"}}}, "trial.stage2.lr: Input should be a valid number"),
        (
            {"search": {"stage2.lr": {"type": "float", "low": 0.1, "high": 0.01}}},
            "low < high must hold, but got (low=0.1, high=0.01)",
        ),
        (
            {"search": {"stage2.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
            "log=true needs low > 0",
        ),
        (
            {"search": {"model.fusion_depth": {"type": "int", "low": 3, "high": 1}}},
            "low <= high must hold, but got (low=3, high=1)",
        ),
        (
            {"search": {"model.backbone": {"choices": ["resnet18", "resnet9"]}}},
            "search.model.backbone: value 'resnet9' is not allowed",
        ),
        (
            {"search": {"stage2.lr": {"type": "float", "low": 0.01, "high": 20.0}}},
            "search.stage2.lr: value 20.0 is not allowed",
        ),
        ({"search": {"stage2.lrr": {"type": "float", "low": 0.01, "high": 0.1}}}, "unknown config"),
        (
            {"search": {"stage2.lr": {"type": "float", "low": 0.01, "high": 0.1, "default": 1.0}}},
            "default 1.0 is outside the distribution",
        ),
        ({"search": {"stage2.lr": {"type": "normal", "low": 0, "high": 1}}}, "does not match"),
    ],
)
def test_bad_spaces_name_the_key(change: dict, expected: str) -> None:
    with pytest.raises(DtlrayError) as info:
        parse_space(_space(**change), source="bad.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("bad.yaml: ")


def test_check_cli_reports_bad_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_space(search={"model.backbone": {"choices": ["alexnet"]}})))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'alexnet'; valid: " in err and "Traceback" not in err
    (tmp_path / "broken.yaml").write_text("trial: [unclosed")
    assert main(["check", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_int_bounds_stay_inclusive_in_optuna() -> None:
    space = parse_space(_space(search={"model.fusion_depth": {"type": "int", "low": 0, "high": 2}}))
    dist = to_optuna_distributions(space)["model.fusion_depth"]
    assert isinstance(dist, optuna.distributions.IntDistribution)
    assert (dist.low, dist.high) == (0, 2)
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    seen = {study.ask({"d": dist}).params["d"] for _ in range(60)}
    assert seen == {0, 1, 2}


def test_defaults_and_trial_config() -> None:
    space = load_space("search_spaces/tiny.yaml")
    defaults = space.default_values()
    # The fixed value is the default when it lies in the distribution, else the centre.
    assert defaults["model.fusion_depth"] == 1
    assert defaults["stage2.lr"] == 0.01
    assert defaults["stage2.lr_mult_backbone"] == 1.0
    cfg = space.trial_config({"stage2.lr": 0.05})
    assert cfg.stage2.lr == 0.05 and cfg.data.targets == ("digits", "faces")
    assert space.max_epochs == 2 and space.grace_period == 1


def test_grace_period_defaults_to_a_third_of_the_epochs() -> None:
    raw = _space(scheduler={"type": "asha"})
    raw["trial"]["stage2"]["epochs"] = 9
    assert parse_space(raw).grace_period == 3
    raw["search"] = {"stage2.epochs": {"type": "int", "low": 3, "high": 12}}
    assert parse_space(raw).max_epochs == 12


@pytest.mark.parametrize(
    ("change", "reused"),
    [
        ({}, True),
        ({"trial.resources.num_workers": 2}, False),  # DDP trials run a TorchTrainer
        ({"trial.data.in_memory_max_mb": 0}, False),  # a streamed split needs Ray Data tasks
        ({"search.resources.num_workers": {"choices": [1, 2]}}, False),
        ({"search.data.image_size": {"choices": [32, 64]}}, False),
        ({"search.stage2.samples_per_class": {"type": "int", "low": 5, "high": 50}}, False),
        ({"search.stage2.epochs": {"type": "int", "low": 2, "high": 4}}, True),
    ],
)
def test_trial_processes_are_reused_only_where_no_trial_needs_a_worker_group(
    data_root: Path, change: dict, reused: bool
) -> None:
    from dtlray.search import reuse_trial_actors

    raw = yaml.safe_load(Path("search_spaces/tiny.yaml").read_text())
    raw["trial"]["data"]["root"] = str(data_root)
    for dotted, value in change.items():
        section, key = dotted.split(".", 1)
        if section == "search":
            raw["search"][key] = value
        else:
            group, name = key.split(".")
            raw["trial"][group][name] = value
    assert reuse_trial_actors(parse_space(raw)) is reused
