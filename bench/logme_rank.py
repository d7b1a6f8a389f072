"""How well LogME ranks stage-1 trunks before any finetuning.

For every stage-1 configuration of the learning-curve table (``bench/curves/curves.parquet``),
load its trunk from the collection's stage-1 store (``--work-dir`` of ``collect_curves.py``),
score each target's train split with LogME (one forward pass; what a trial reports as
``target/<task>/logme``), and compare the ranking with the best final target val acc that
configuration reached over the table's finetune grid. Prints Kendall's tau, overall and per
target, ending with ``KENDALL TAU LogME vs final target val acc = X``; writes the scores next to
the table (``curves/logme.json``), where ``search_quality.py`` replays the LogME rung with them.

    .venv/bin/python bench/logme_rank.py       # seconds, once the collection's trunks exist
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collect_curves import SPACE, grid_config  # noqa: E402  (the collection's configs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=ROOT / "bench" / "curves" / "curves.parquet")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "dtlray-curves"))
    parser.add_argument(
        "--out", type=Path, default=None, help="the scores (default: logme.json by the table)"
    )
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    import torch
    from scipy.stats import kendalltau

    from dtlray.models import load_trunk
    from dtlray.search_space import load_space
    from dtlray.stage1_cache import has_stage1, load_stage1
    from dtlray.stages import build_model, finetune_stage
    from dtlray.train_loop import target_logme
    from dtlray.trial import plan_trial
    from dtlray.worker import WorkerEnv, read_shard

    torch.set_num_threads(1)
    table = pq.read_table(args.table).to_pylist()
    last = max(r["epoch"] for r in table)
    best: dict[tuple[Any, ...], float] = {}
    best_task: dict[tuple[Any, ...], dict[str, float]] = {}  # of the same (best mean) finetune
    for row in table:
        if row["epoch"] == last and np.isfinite(row["val_acc"]):
            key = (row["backbone"], row["fusion_depth"], row["stage1_epochs"])
            if row["val_acc"] > best.get(key, -1.0):
                best[key] = row["val_acc"]
                best_task[key] = {k[: -len("/val_acc")]: v for k, v in row.items()
                                  if k.endswith("/val_acc") and k != "val_acc"}  # fmt: skip
    space = load_space(SPACE)
    rows = []
    for backbone, depth, s1 in sorted(best):
        job = {"backbone": backbone, "depth": depth, "stage1_epochs": s1, "overrides": {}}
        cfg = grid_config(space, job, 0.01, 1.0)
        trial = plan_trial(cfg, storage_path=args.work_dir, run_test=False, in_process=True)
        if not has_stage1(trial.plan.stage1_dir):
            print(f"skip {backbone} d{depth} s{s1}: no stored trunk in {args.work_dir}")
            continue
        spec = finetune_stage(cfg, trial.plan.datasets)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, spec.heads, load_weights=False)
        load_trunk(model, load_stage1(trial.plan.stage1_dir)[0])
        env = WorkerEnv(
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
            seed=cfg.seed,
            image_size=cfg.data.image_size,
            channels=cfg.data.channels,
        )
        train = {t.name: read_shard(trial.datasets[t.train_key], t.meta) for t in spec.tasks}
        scores = target_logme(model, spec, train, env)
        rows.append(((backbone, depth, s1), scores, best[(backbone, depth, s1)]))
        shown = "  ".join(f"{k.split('/')[1]} {v:+.4f}" for k, v in scores.items())
        print(f"{backbone:9} depth {depth} stage-1 epochs {s1}: LogME {shown}   "
              f"best final val acc {best[(backbone, depth, s1)]:.4f}")  # fmt: skip
    if len(rows) < 3:
        print("too few stored trunks to rank")
        return 1
    out = args.out or args.table.parent / "logme.json"
    records = [
        {"backbone": b, "fusion_depth": d, "stage1_epochs": s1, **scores}
        for (b, d, s1), scores, _ in rows
    ]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(out)  # never a half-written file
    print(f"scores: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    tasks = [k for k in rows[0][1]]
    accs = [acc for _, _, acc in rows]
    for task in tasks:
        name = task.split("/")[1]
        own = [best_task[key][name] for key, _, _ in rows]
        tau, _ = kendalltau([s[task] for _, s, _ in rows], own)
        print(f"Kendall tau, {task} vs final {name} val acc: {tau:+.3f}")
    mean = [float(np.mean(list(s.values()))) for _, s, _ in rows]
    tau, p = kendalltau(mean, accs)
    pairs = len(list(itertools.combinations(rows, 2)))
    print(f"over {len(rows)} stage-1 configurations ({pairs} pairs); p = {p:.3f}")
    print(f"KENDALL TAU LogME vs final target val acc = {tau:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
