"""The two-axis search for real against ASHA alone: same trial budget, same machine, one run
after the other, nothing cached.

Runs ``dtlray tune search_spaces/quickstart.yaml`` (two-axis) and ``dtlray tune
search_spaces/quickstart_asha.yaml`` (12 trials each, 2 at a time) as a user does, each on a new
storage directory so no stage-1 result is reused across them (the prepared datasets are), and
times each from the command's start to its exit (``best.json`` written). Prints, per search, the
wall time, the best trial's val and test accuracy, the stage-1 epochs computed and the
useful-work efficiency (the command's slot-seconds, its wall x 2 trials at a time, over the
seconds that trained something: the stage-1 runs computed plus every finetune train pass;
1.0 = all), then

    TWO-AXIS SPEEDUP asha/two-axis = X (best val two-axis A vs asha B: equal or better|worse)

(goal >= 2 at equal or better best val acc). ``--pairs N`` repeats the pair N times, alternating
which search goes first, and prints the median and the spread. A pair takes about 10 minutes on
2 idle cores; each finished search is kept under ``--work-dir``, so a rerun with the same
directory skips the searches already done (an interrupted run continues).

    .venv/bin/python bench/two_axis_real.py              # one pair, ~10 min
    .venv/bin/python bench/two_axis_real.py --pairs 3    # ~30 min
    .venv/bin/python bench/two_axis_real.py --pairs 3 --vary-seed   # seeds 0, 1, 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = {
    "two-axis": ROOT / "search_spaces" / "quickstart.yaml",
    "asha": ROOT / "search_spaces" / "quickstart_asha.yaml",
}


def run_search(name: str, space: Path, storage: Path, seed: int | None = None) -> dict:
    """One search from the CLI on its own storage; its wall and best trial (cached on disk).
    ``seed``: the trials' ``seed`` (weights, batches, dropout), else the space's."""
    done = storage / "bench.json"
    if done.exists() and json.loads(done.read_text()).get("seed") == seed:
        return json.loads(done.read_text())
    shutil.rmtree(storage, ignore_errors=True)  # a search interrupted mid-way starts over
    storage.mkdir(parents=True)
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "dtlray", "tune", str(space), "--storage-path", str(storage),
           "--name", name]  # fmt: skip
    cmd += [] if seed is None else ["--set", f"seed={seed}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    (storage / "console.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}; see {storage / 'console.log'}")
    best = json.loads((storage / name / "best.json").read_text())
    from dtlray.report.records import load_trials

    trials = load_trials(storage / name)
    fixed_epochs = best["config"]["stage1"]["epochs"]  # a search that does not set them
    computed = sum(
        t.params.get("stage1.epochs", fixed_epochs) - t.stage1_reused_epochs
        for t in trials
        if t.stage1 == "computed"
    )
    record = {
        "name": name,
        "seed": seed,
        "wall_s": wall,
        "load_at_start": load,
        "best_val": best["objective"]["value"],
        "best_test": (best.get("test") or {}).get("target/test_acc"),
        "best_searched": best["searched"],
        "stage1_epochs_computed": computed,
        "useful_s": sum(t.useful_seconds for t in trials),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument(
        "--vary-seed",
        action="store_true",
        help="pair P runs both searches with the trials' seed=P (pair 1: seed 0, the space's): "
        "the pairs then measure the best val's spread too, not only time",
    )
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "dtlray-2axis")
    args = parser.parse_args(argv)
    from dtlray.search_space import load_space  # light: no torch, no Ray

    # Trials at a time, for the useful-work efficiency (the command's slot-seconds).
    slots = {name: load_space(path).max_concurrent_trials for name, path in SEARCHES.items()}
    print(f"{os.cpu_count()} CPUs | load average {os.getloadavg()[0]:.2f}", flush=True)
    ratios, vals = [], {name: [] for name in SEARCHES}
    for pair in range(args.pairs):
        seed = pair if args.vary_seed else None
        order = list(SEARCHES) if pair % 2 == 0 else list(reversed(SEARCHES))
        got = {}
        for name in order:
            where = args.work_dir / f"pair{pair}" / name
            got[name] = r = run_search(name, SEARCHES[name], where, seed)
            vals[name].append(r["best_val"])
            test = "?" if r["best_test"] is None else f"{r['best_test']:.4f}"
            shown = "" if seed is None else f" seed {seed}"
            # The command's slot-seconds over the seconds that trained something.
            useful = f"{r['wall_s'] * slots[name] / r['useful_s']:.2f}" if "useful_s" in r else "?"
            print(f"pair {pair + 1}{shown} {name:8}: {r['wall_s']:6.1f} s (load "
                  f"{r['load_at_start']:.2f} at start), best val {r['best_val']:.4f} test "
                  f"{test}, stage-1 epochs computed {r['stage1_epochs_computed']}, useful-work "
                  f"efficiency {useful}", flush=True)  # fmt: skip
        ratio = got["asha"]["wall_s"] / got["two-axis"]["wall_s"]
        ratios.append(ratio)
        verdict = "equal or better" if got["two-axis"]["best_val"] >= got["asha"]["best_val"] \
            else "worse"  # fmt: skip
        print(f"TWO-AXIS SPEEDUP asha/two-axis = {ratio:.2f} (best val two-axis "
              f"{got['two-axis']['best_val']:.4f} vs asha {got['asha']['best_val']:.4f}: "
              f"{verdict})", flush=True)  # fmt: skip
    if len(ratios) > 1:
        print(f"median {statistics.median(ratios):.2f} over {len(ratios)} pairs "
              f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if args.vary_seed and len(ratios) > 1:
        better = sum(a >= b for a, b in zip(vals["two-axis"], vals["asha"], strict=True))
        print(f"best val over {len(ratios)} seeds: two-axis median "
              f"{statistics.median(vals['two-axis']):.4f} ({min(vals['two-axis']):.4f}-"
              f"{max(vals['two-axis']):.4f}), asha median "
              f"{statistics.median(vals['asha']):.4f} ({min(vals['asha']):.4f}-"
              f"{max(vals['asha']):.4f}); two-axis equal or better in {better} of "
              f"{len(ratios)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
