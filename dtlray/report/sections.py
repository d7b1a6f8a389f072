"""The report's sections and :func:`build_report`: an experiment in, ``<experiment>/report/`` out.

Each section turns the experiment's records (and the plots it draws) into document blocks; the
blocks are rendered to ``report.md`` and ``report.html`` in a fresh directory that replaces the
previous report only once it is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtlray.baseline import run_baseline
from dtlray.errors import DtlrayError
from dtlray.experiment import BEST_FILE, ExperimentDir
from dtlray.report.document import (
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Note,
    Paragraph,
    Table,
    render_html,
    render_markdown,
)
from dtlray.report.plots import plot_curves, plot_history, plot_importances, plot_stage1, use_agg
from dtlray.report.records import (
    ERROR_FILE,
    Experiment,
    check_experiment_dir,
    finite,
    load_experiment,
)
from dtlray.report.study import build_study, param_importances
from dtlray.report.transfer import (
    CONFIDENCE,
    GainRow,
    finetuned_predictions,
    gain_intervals,
    load_baseline,
    scratch_config,
    stage1_summary,
    transfer_gain,
    transfer_summary,
)

DEFAULT_TOP_K = 5


@dataclass
class _Baseline:
    record: dict[str, Any] | None
    missing_reason: str = ""
    rows: list[GainRow] = field(default_factory=list)
    split: str = "test"
    no_interval: str = ""  # why the gains have no confidence interval


def build_report(
    experiment: str | os.PathLike[str],
    *,
    baseline: bool = False,
    baseline_seeds: int = 1,
    address: str | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> Path:
    """Write ``<experiment>/report/`` (Markdown, HTML, PNGs); return that directory.

    With a scratch baseline, each target's transfer gain gets a confidence interval, and the
    gain table is stored in ``best.json`` as its ``transfer`` entry.

    Args:
        experiment: the experiment directory (``<storage-path>/<name>``).
        baseline: train the scratch baseline when it is missing (needs Ray).
        baseline_seeds: scratch runs (seeds) the baseline should have; ``baseline`` trains the
            missing ones.
        address: Ray cluster address for the baseline (default: embedded local Ray).
        top_k: how many trials get a coloured learning curve.

    Raises:
        DtlrayError: not a usable experiment (missing, not Tune's, running, empty, no
            ``best.json``), or the baseline run failed on bad input.
    """
    if top_k < 1:
        raise DtlrayError(f"--top-k must be at least 1, got {top_k}")
    if baseline_seeds < 1:
        raise DtlrayError(f"--baseline-seeds must be at least 1, got {baseline_seeds}")
    exp = load_experiment(check_experiment_dir(experiment))
    expected = scratch_config(exp.best)
    record, why = load_baseline(exp.path, expected)
    if baseline and (record is None or len(record["runs"]) < baseline_seeds):
        trial_id = str(exp.best.get("trial_id"))
        record = run_baseline(
            exp.path, expected, trial_id, address, seeds=baseline_seeds, stored=record
        )
        why = ""
    base = _Baseline(record, why)
    if record is not None:
        base.rows, base.split, base.no_interval = _gain_rows(exp, record)
        exp.best["transfer"] = transfer_summary(base.rows, base.split, len(record["runs"]))
        ExperimentDir(str(exp.path)).write_best(exp.best)
    out = Path(ExperimentDir(str(exp.path)).report_dir)
    _write_atomically(out, lambda tmp: _write_report(exp, base, top_k, tmp))
    return out


def _gain_rows(exp: Experiment, record: Mapping[str, Any]) -> tuple[list[GainRow], str, str]:
    """The gain table's rows (with intervals where per-image test predictions exist), the split
    compared, and why there are no intervals (empty when there are)."""
    best = exp.best
    targets = list(best["config"]["data"]["targets"])
    finetuned: Mapping[str, float] = best.get("test", {})
    split = "test"
    if not all(f"target/{t}/test_acc" in finetuned for t in targets):
        finetuned, split = best.get("val", {}), "val"
    intervals, why = None, f"{BEST_FILE} has no test accuracy"
    if split == "test":
        predictions, why = finetuned_predictions(exp.path, best)
        if predictions is not None:
            scratch = [run["predictions"] for run in record["runs"]]
            intervals = gain_intervals(targets, predictions, scratch)
    rows = transfer_gain(targets, finetuned, record["metrics"], split=split, intervals=intervals)
    return rows, split, why


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a fresh hidden directory beside ``target``, then swap it in whole."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is for sharing
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_report(exp: Experiment, base: _Baseline, top_k: int, out: Path) -> None:
    use_agg()
    study = build_study(exp)
    blocks: list[Block] = []
    blocks += _summary_section(exp)
    blocks += _best_section(exp)
    blocks += _gain_section(exp, base)
    blocks += _results_section(exp)

    blocks.append(Heading("Optimization history"))
    plot_history(study, exp.metric, out / "history.png")
    blocks.append(Image("history.png", f"{exp.metric} per trial and the best so far"))

    blocks.append(Heading("Parameter importances"))
    importances, why_not = param_importances(study)
    if importances:
        plot_importances(importances, out / "importance.png")
        blocks.append(Image("importance.png", "fANOVA parameter importances"))
        blocks.append(
            Table(
                header=("parameter", "importance"),
                rows=tuple((f"`{k}`", f"{v:.3f}") for k, v in importances.items()),
                align="lr",
                caption=f"fANOVA (Optuna, seed 0) over {len(study.trials)} trial(s) on "
                f"{exp.metric}; with few trials treat these as rough.",
            )
        )
    else:
        blocks.append(Note(why_not or ""))

    blocks.append(Heading("Learning curves"))
    top = plot_curves(exp, top_k, out / "curves.png")
    blocks.append(Image("curves.png", f"{exp.metric} per finetune epoch, top trials"))
    blocks.append(
        Paragraph(
            f"{exp.metric} after each finetune epoch for the {len(top)} best trial(s) "
            "(others in grey); a curve that ends early is a trial ASHA stopped."
        )
    )

    blocks += _stage1_section(exp, out)
    title = f"dtlray report: {exp.name}"
    (out / "report.html").write_text(render_html(title, blocks))
    (out / "report.md").write_text(render_markdown(title, blocks))


def _summary_section(exp: Experiment) -> list[Block]:
    best = exp.best
    statuses = [t.status_text for t in exp.trials]
    counts = ", ".join(
        f"{statuses.count(s)} {s}" for s in sorted(set(statuses), key=statuses.index)
    )
    cfg = best["config"]
    items = [
        f"Experiment: `{exp.path}`",
        f"Pipeline: {cfg['data']['source']} → {', '.join(cfg['data']['targets'])}",
        f"Trials: {len(exp.trials)} ({counts})",
        f"Objective: `{exp.metric}` ({exp.mode}), the last value each trial reported",
        f"Best trial: **{best.get('trial_id')}** with {exp.metric} = "
        f"{_acc(finite(best['objective']['value']))}",
    ]
    test = best.get("test", {}).get("target/test_acc")
    if test is not None:
        items.append(f"Its test accuracy (mean over targets): {_acc(test)}")
    items.append(f"Generated: {time.strftime('%Y-%m-%d %H:%M:%S')}")
    blocks: list[Block] = [Heading("Summary"), Bullets(tuple(items))]
    blocks += [Note(f"Note: {note}") for note in exp.notes]
    return blocks


def _best_section(exp: Experiment) -> list[Block]:
    best = exp.best
    searched = best.get("searched", {})
    blocks: list[Block] = [
        Heading("Best configuration"),
        Paragraph(
            f"Trial **{best.get('trial_id')}**, {best.get('epochs')} finetune epoch(s). "
            "Test accuracy is computed for this trial only; the search chose on validation."
        ),
    ]
    if searched:
        blocks.append(
            Table(
                header=("searched parameter", "value"),
                rows=tuple((f"`{k}`", _fmt(v)) for k, v in searched.items()),
            )
        )
    val, test = best.get("val", {}), best.get("test", {})
    targets = list(best["config"]["data"]["targets"])
    rows = [
        (
            t,
            _acc(finite(val.get(f"target/{t}/val_acc"))),
            _acc(finite(test.get(f"target/{t}/test_acc"))),
        )
        for t in targets
    ]
    rows.append(
        (
            "**mean**",
            _acc(finite(val.get("target/val_acc"))),
            _acc(finite(test.get("target/test_acc"))),
        )
    )
    blocks.append(
        Table(
            header=("target", "val acc", "test acc"),
            rows=tuple(rows),
            align="lrr",
            caption="Accuracy per target of the best trial",
        )
    )
    source = finite(val.get("source/val_acc"))
    if source is not None:
        blocks.append(
            Paragraph(
                f"Stage 1 reached {_acc(source)} validation accuracy on the source "
                f"({best['config']['data']['source']})."
            )
        )
    import yaml

    blocks.append(Paragraph(f"The full configuration (`config` in `{BEST_FILE}`):"))
    blocks.append(Code(yaml.safe_dump(best["config"], sort_keys=False), "yaml"))
    return blocks


def _gain_section(exp: Experiment, base: _Baseline) -> list[Block]:
    best = exp.best
    epochs = best.get("epochs")
    blocks: list[Block] = [Heading("Transfer gain")]
    if base.record is None:
        blocks.append(
            Paragraph(
                f"No scratch baseline ({base.missing_reason}). Train it — the best configuration "
                f"with `stage2.init: scratch` for {epochs} finetune epoch(s) — and rebuild this "
                f"report with: `dtlray report {exp.path} --baseline`"
            )
        )
        return blocks
    rows, split = base.rows, base.split
    seeds = len(base.record["runs"])
    level = f"{CONFIDENCE:.0%}"
    table_rows = []
    for row in rows:
        name = "**mean**" if row is rows[-1] else row.target
        ci = "—" if row.ci_pp is None else f"{row.ci_pp[0]:+.1f} to {row.ci_pp[1]:+.1f}"
        verdict = f"**{row.verdict}**" if row.verdict.endswith(" transfer") else row.verdict
        table_rows.append(
            (name, _acc(row.finetuned), _acc(row.scratch), f"{row.gain_pp:+.1f}", ci, verdict)
        )
    scratch_col = f"from scratch ({split} acc" + (f", mean of {seeds} seeds)" if seeds > 1 else ")")
    blocks.append(
        Table(
            header=(
                "target",
                f"finetuned from stage 1 ({split} acc)",
                scratch_col,
                "gain (pp)",
                f"{level} CI (pp)",
                "transfer",
            ),
            rows=tuple(table_rows),
            align="lrrrrl",
            caption=f"Best configuration finetuned from stage 1 vs the same configuration "
            f"trained from scratch on the targets, at matched epochs ({epochs} finetune "
            f"epoch(s) each). Gain in percentage points. CI: a paired bootstrap over the "
            f"{split} images (both models predict the same ones) and the scratch run's "
            f"{seeds} seed(s); transfer is called only where the interval excludes 0.",
        )
    )
    if split == "val":
        blocks.append(Note(f"{BEST_FILE} has no test accuracy; validation accuracy is compared."))
    if base.no_interval and any(r.ci_pp is None for r in rows):
        blocks.append(Note(f"No confidence intervals: {base.no_interval}."))
    for verdict in ("negative transfer", "positive transfer"):
        named = [r.target for r in rows[:-1] if r.verdict == verdict]
        if named:
            what = "hurt" if verdict.startswith("negative") else "helped"
            blocks.append(
                Paragraph(
                    f"{verdict.capitalize()} on {', '.join(named)}: pretraining on "
                    f"{best['config']['data']['source']} {what} there ({level} CI excludes 0)."
                )
            )
    unclear = [r.target for r in rows[:-1] if r.verdict == "no significant difference"]
    if unclear:
        blocks.append(
            Paragraph(
                f"No significant difference on {', '.join(unclear)}: the interval includes 0, "
                f"so these {split} images cannot tell the two apart (how many there are bounds "
                "how narrow the interval can get; more scratch seeds, `--baseline-seeds N`, "
                "firm up the scratch side)."
            )
        )
    return blocks


def _results_section(exp: Experiment) -> list[Block]:
    names = list(exp.distributions) or sorted({k for t in exp.trials for k in t.params})
    number = {t.trial_id: i for i, t in enumerate(exp.trials)}
    best_id = exp.best.get("trial_id")
    rows = []
    for trial in exp.ranked():
        trial_id = f"**{trial.trial_id}**" if trial.trial_id == best_id else trial.trial_id
        epochs = f"{trial.epochs}/{trial.planned_epochs}" if trial.planned_epochs else "—"
        rows.append(
            (
                str(number[trial.trial_id]),
                trial_id,
                *(_fmt(trial.params.get(n, "—")) for n in names),
                _acc(trial.value(exp.metric)),
                epochs,
                trial.stage1 or "—",
                trial.status_text,
            )
        )
    blocks: list[Block] = [
        Heading("All trials"),
        Table(
            header=(
                "#",
                "trial",
                *(f"`{n}`" for n in names),
                exp.metric,
                "epochs",
                "stage 1",
                "status",
            ),
            rows=tuple(rows),
            align="rl" + "l" * len(names) + "rrll",
            caption=f"Best first by {exp.metric} (last reported value). #: start order, as "
            "in the history plot. Epochs: run/planned — ASHA stops poor trials early.",
        ),
    ]
    errored = [t for t in exp.trials if t.error]
    if errored:
        blocks.append(
            Table(
                header=("trial", "status", f"error (last line of {ERROR_FILE})"),
                rows=tuple((t.trial_id, t.status_text, t.error or "") for t in errored),
                caption=f"Trials that failed (full tracebacks in run_*/{ERROR_FILE})",
            )
        )
    return blocks


def _stage1_section(exp: Experiment, out: Path) -> list[Block]:
    summary = stage1_summary(exp.trials)
    blocks: list[Block] = [Heading("Stage-1 reuse")]
    if summary.computed + summary.reused == 0:
        blocks.append(Note("No trial used stage 1 (all trained from scratch)."))
        return blocks
    plot_stage1(summary, out / "stage1.png")
    blocks.append(Image("stage1.png", "stage-1 runs computed vs reused, seconds spent vs saved"))
    text = (
        f"{summary.computed} trial(s) pretrained stage 1 ({summary.seconds_spent:.0f} s), "
        f"{summary.reused} reused a stored stage 1, saving {summary.seconds_saved:.0f} s of "
        "pretraining"
    )
    if summary.continued:
        text += (
            f"; {summary.continued} of the pretraining trial(s) continued a stored constant "
            f"phase of their configuration (`stage1.schedule: wsd`, the stage tree) instead of "
            f"starting over, skipping {summary.epochs_continued:.3g} stage-1 epoch(s)"
        )
    if summary.not_used:
        text += f"; {summary.not_used} trained from scratch"
    blocks.append(Paragraph(text + "."))
    return blocks


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
