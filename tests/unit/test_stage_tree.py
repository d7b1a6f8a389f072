"""The stage tree: a ``schedule: wsd`` stage 1 stores its constant phase, and a longer budget of
the same configuration continues it -- training only the rest, and ending where a run from
scratch ends. Real data, the real worker loop, in this process (no Ray needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dtlray.config import TrialConfig
from dtlray.errors import DtlrayError
from dtlray.search_space import parse_space
from dtlray.stage1_cache import load_stage1, longest_constant_phase, tree_dir
from dtlray.train_loop import build_scheduler, run_worker
from dtlray.trial import plan_trial
from dtlray.trial_data import ensure_dataset


class Session:
    """The worker loop's session for a run in this process: the splits, and its reports."""

    def __init__(self, datasets: dict[str, Any]) -> None:
        self.datasets, self.reports = datasets, []

    def dataset(self, key: str) -> Any:
        return self.datasets[key]

    def checkpoint(self) -> None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(metrics)


def tiny(data_root: Path, **flat: Any) -> TrialConfig:
    raw = yaml.safe_load(Path("search_spaces/tiny.yaml").read_text())
    cfg = parse_space(raw).trial_config()
    return TrialConfig.from_flat(
        {
            "data.root": str(data_root),
            "data.source_max_rows": 256,
            "model.fusion_width": 32,
            "model.fusion_dropout": 0.2,  # randomness in training: continuing must replay it
            "stage1.schedule": "wsd",
            "stage2.epochs": 1,
            "resources.use_gpu": False,
            **flat,
        },
        base=cfg,
    )


def run(cfg: TrialConfig, storage: Path) -> dict[str, Any]:
    trial = plan_trial(cfg, storage_path=str(storage), run_test=False, in_process=True)
    session = Session(trial.datasets)
    run_worker(trial.worker_config, session)
    return session.reports[-1]


@pytest.mark.parametrize(
    ("epochs", "per_epoch", "fraction", "factors"),
    [
        (4, 1, 0.25, [1, 1, 1, 0.5]),
        (8, 1, 0.25, [1] * 6 + [0.75, 0.25]),
        (1, 1, 0.25, [0.5]),
        (2, 4, 0.25, [1] * 6 + [0.75, 0.25]),  # per step: the constant phase ends mid-epoch
        (0.5, 4, 0.5, [1, 0.5]),  # half an epoch: 2 of its 4 steps
        (0.75, 4, 0.25, [1, 1, 0.5]),
    ],
)
def test_wsd_is_constant_then_decays_linearly_per_step(
    epochs: float, per_epoch: int, fraction: float, factors: list
) -> None:
    cfg = TrialConfig.from_flat(
        {"stage1.schedule": "wsd", "stage1.epochs": epochs, "stage1.decay_fraction": fraction}
    )
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg.stage1, per_epoch)
    warmup, constant, total = cfg.stage1.wsd_steps(per_epoch)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"] / 0.1)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(factors)
    assert (warmup, constant) == (0, factors.count(1))


def test_a_fractional_budget_needs_wsd_and_a_whole_one_is_an_int() -> None:
    with pytest.raises(DtlrayError, match="epochs=0.5 is not a whole number: only schedule: wsd"):
        TrialConfig.from_flat({"stage1.epochs": 0.5})  # cosine steps per epoch
    whole = TrialConfig.from_flat({"stage1.schedule": "wsd", "stage1.epochs": 2.0})
    assert type(whole.stage1.epochs) is int  # one budget, one cache key, whichever was written
    assert whole.stage1_key("fp") == TrialConfig.from_flat(
        {"stage1.schedule": "wsd", "stage1.epochs": 2}
    ).stage1_key("fp")


def test_wsd_warmup_rises_then_holds_and_must_fit_before_the_decay() -> None:
    cfg = TrialConfig.from_flat(
        {"stage1.schedule": "wsd", "stage1.epochs": 6, "stage1.warmup_epochs": 2}
    )
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg.stage1)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.75, 1, 1, 0.75, 0.25])
    with pytest.raises(DtlrayError, match="warmup_epochs=4 does not fit before the decay"):
        TrialConfig.from_flat(
            {"stage1.schedule": "wsd", "stage1.epochs": 4, "stage1.warmup_epochs": 4}
        )


def test_budgets_share_a_key_without_the_budget_and_other_schedules_have_none() -> None:
    two, three = (
        TrialConfig.from_flat({"stage1.schedule": "wsd", "stage1.epochs": e}) for e in (2, 3)
    )
    assert two.stage1_key("fp") != three.stage1_key("fp")
    assert two.stage1_tree_key("fp") == three.stage1_tree_key("fp")
    lr = TrialConfig.from_flat({"stage1.schedule": "wsd", "stage1.lr": 0.1})
    assert lr.stage1_tree_key("fp") != two.stage1_tree_key("fp")  # a constant phase differs
    assert TrialConfig().stage1_tree_key("fp") is None  # cosine: no run is a prefix of another


def test_a_longer_budget_continues_the_stored_constant_phase_even_mid_epoch(
    data_root: Path, tmp_path: Path
) -> None:
    # 256 source rows at batch 64: 4 steps an epoch. Budget 0.5 is 2 steps, constant 1;
    # budget 2 is 8 steps, constant 6; budget 3 is 12 steps, constant 9.
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    first = run(tiny(data_root, **{"stage1.epochs": 0.5}), shared)
    assert first["stage1/mode"] == "computed" and first["stage1/reused_epochs"] == 0
    # The trunk's zero-training pre-rank of each target, in every finetune report.
    assert all(math.isfinite(first[f"target/{t}/logme"]) for t in ("digits", "faces"))

    cfg = tiny(data_root, **{"stage1.epochs": 3})
    source = ensure_dataset(cfg.data.source, cfg.data.root)
    tree = tree_dir(str(shared), cfg.stage1_tree_key(source.fingerprint))
    assert longest_constant_phase(tree, at_most=9, steps_per_epoch=4).steps == 1
    assert longest_constant_phase(tree, at_most=9, steps_per_epoch=8) is None  # other epochs
    second = run(tiny(data_root, **{"stage1.epochs": 2}), shared)  # from step 1, mid-epoch 1
    assert second["stage1/mode"] == "computed" and second["stage1/reused_epochs"] == 0.25
    assert longest_constant_phase(tree, at_most=9, steps_per_epoch=4).steps == 6
    third = run(cfg, shared)  # from step 6, mid-epoch 2
    assert third["stage1/mode"] == "computed" and third["stage1/reused_epochs"] == 1.5
    assert longest_constant_phase(tree, at_most=9, steps_per_epoch=4).steps == 9  # its own
    # What it cost counts the reused steps' compute too.
    assert third["stage1/compute_seconds"] > third["stage1/seconds"]

    # Continuing is the same training as running the 3 epochs from scratch: the same batches
    # (the rest of the epoch's permutation) and the same dropout draws.
    scratch = run(cfg, alone)
    assert scratch["stage1/reused_epochs"] == 0
    continued, _ = load_stage1(f"{shared}/_stage1/{cfg.stage1_key(source.fingerprint)}")
    fresh, _ = load_stage1(f"{alone}/_stage1/{cfg.stage1_key(source.fingerprint)}")
    assert continued.keys() == fresh.keys()
    for name in fresh:
        torch.testing.assert_close(continued[name], fresh[name], rtol=1e-4, atol=1e-5)
    assert third["source/val_acc"] == pytest.approx(scratch["source/val_acc"], abs=1e-6)

    # The whole 3-epoch result is stored now: the next trial reuses all of it.
    again = run(cfg, shared)
    assert again["stage1/mode"] == "reused" and again["stage1/reused_epochs"] == 3


def test_stage1_validates_on_the_first_source_val_rows_asked_and_trains_the_same(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny(data_root, **{"stage1.epochs": 0.5, "data.source_val_max_rows": 40})
    trial = plan_trial(cfg, storage_path=str(tmp_path / "a"), run_test=False, in_process=True)
    (val_key,) = [k for k in trial.datasets if k.startswith("pretrain") and k.endswith("val")]
    assert trial.datasets[val_key].table.num_rows == 40
    fewer = run(cfg, tmp_path / "a")
    whole = run(tiny(data_root, **{"stage1.epochs": 0.5}), tmp_path / "b")
    # Accuracy over 40 rows is a multiple of 1/40; the same weights finetune to the same result.
    assert math.isclose(fewer["source/val_acc"] * 40, round(fewer["source/val_acc"] * 40))
    assert fewer["target/val_acc"] == whole["target/val_acc"]
    assert fewer["target/val_loss"] == whole["target/val_loss"]


def test_a_streamed_source_refuses_a_budget_that_ends_mid_epoch(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny(data_root, **{"stage1.epochs": 0.5, "data.in_memory_max_mb": 0})  # all stream
    with pytest.raises(DtlrayError, match=r"stage1.epochs=0.5 ends mid-epoch, but the source"):
        plan_trial(cfg, storage_path=str(tmp_path))
