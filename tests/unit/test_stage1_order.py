"""Stage-1-aware ordering around dtlray's real Optuna searcher (no Ray needed: a searcher is
called by Tune's controller exactly as here -- suggest, results, completion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import yaml

from dtlray.search_space import parse_space
from dtlray.searcher import build_searcher
from dtlray.stage1_order import Stage1OrderedSearch


def key(config: dict[str, Any]) -> str:
    return f"{config.get('model.backbone', 'resnet18')}-{config['model.fusion_depth']}"


def ordered(
    num_samples: int, stored: set[str], seed: int = 0, one_backbone: bool = False
) -> Stage1OrderedSearch:
    raw = yaml.safe_load(Path("search_spaces/quickstart_asha.yaml").read_text())
    raw["searcher"]["seed"] = seed
    if one_backbone:  # two stage-1 configs: suggestions often share the busy one
        del raw["search"]["model.backbone"]
    inner = build_searcher(parse_space(raw), study_name=f"order-{seed}")
    return Stage1OrderedSearch(
        inner,
        stage1_key=lambda c: f"{c.get('model.backbone', 'resnet18')}-{c['model.fusion_depth']}",
        is_stored=stored.__contains__,
        num_samples=num_samples,
    )


def finish(search: Stage1OrderedSearch, trial_id: str, value: float) -> None:
    result = {"training_iteration": 8, "epoch": 8, "target/val_acc": value}
    search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, result=result)


def test_no_trial_is_started_to_wait_while_others_can_run() -> None:
    exercised = 0
    for seed in range(10):
        stored: set[str] = set()
        search = ordered(num_samples=8, stored=stored, seed=seed, one_backbone=True)
        busy = key(search.suggest("t0"))  # the default point: it computes its stage 1
        # While t0 computes, no trial that needs the same stage 1 is handed out.
        assert key(search.suggest("t1")) != busy
        if not search.reordered:
            continue  # the searcher's second pick needed the other stage 1 anyway
        exercised += 1
        assert [key(h.config) for h in search._held] == [busy] * len(search._held)
        # t0's first finetune epoch: its stage 1 is stored; the held suggestion goes first.
        stored.add(busy)
        search.on_trial_result("t0", {"training_iteration": 1, "epoch": 1, "target/val_acc": 0.5})
        held = search._held[0].config
        assert search.suggest("t2") == held
    assert exercised >= 2  # the seeds above do pick the busy stage 1 second


def test_every_suggestion_runs_once_and_reaches_its_own_optuna_trial() -> None:
    for seed in range(3):
        stored: set[str] = set()
        search = ordered(num_samples=10, stored=stored, seed=seed)
        handed: dict[str, dict[str, Any]] = {}
        running: list[str] = []
        n = 0
        while True:
            while len(running) < 2:  # two slots
                config = search.suggest(f"t{n}")
                if config is None or config == search.FINISHED:
                    break
                handed[f"t{n}"] = config
                running.append(f"t{n}")
                n += 1
            if not running:
                break
            done = running.pop(0)
            stored.add(key(handed[done]))
            finish(search, done, value=0.1 + 0.01 * int(done[1:]))
        assert len(handed) == 10  # no suggestion lost, none beyond num_samples
        study: optuna.Study = search.searcher._ot_study
        trials = study.get_trials()
        assert len(trials) == 10
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        # Each Tune trial's value landed on the Optuna trial that suggested its config.
        by_value = {round(t.value, 4): t.params for t in trials}
        for trial_id, config in handed.items():
            assert by_value[round(0.1 + 0.01 * int(trial_id[1:]), 4)] == config


def test_when_every_remaining_suggestion_would_wait_the_oldest_goes() -> None:
    stored: set[str] = set()
    search = ordered(num_samples=2, stored=stored)
    first = search.suggest("t0")
    second = search.suggest("t1")  # only one left to ask for: it goes even if it must wait
    assert second is not None and second != search.FINISHED
    assert search.suggest("t2") == search.FINISHED
    assert key(first)  # both handed out; nothing held at the end
    assert not search._held


def test_tune_saves_and_restores_it_with_the_searcher_inside(tmp_path: Path) -> None:
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    stored: set[str] = set()
    search = ordered(num_samples=8, stored=stored, seed=3, one_backbone=True)
    configs = [search.suggest(f"t{i}") for i in range(3)]
    # As dtlray tune runs it: behind Tune's concurrency limiter, inside a SearchGenerator.
    SearchGenerator(ConcurrencyLimiter(search, max_concurrent=2)).save_to_dir(
        str(tmp_path), session_str="s"
    )
    again = ordered(num_samples=8, stored=stored, seed=3, one_backbone=True)
    SearchGenerator(ConcurrencyLimiter(again, max_concurrent=2)).restore_from_dir(str(tmp_path))
    assert again._inner_ids == search._inner_ids and again._asked == search._asked
    assert [h.config for h in again._held] == [h.config for h in search._held]
    assert len(again.searcher._ot_study.trials) == len(search.searcher._ot_study.trials)
    assert configs[0] is not None
