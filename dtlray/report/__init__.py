"""``dtlray report EXPERIMENT``: a finished search as Markdown + HTML, with the plots to look at.

The report reads the experiment directory's plain files — each trial's ``params.json`` and
``result.json`` (one JSON line per finetune epoch), Tune's ``experiment_state-*.json`` for the
trial statuses, dtlray's ``best.json`` and ``space.json`` — and writes ``<experiment>/report/``:

- ``report.md`` and ``report.html`` (the same content; the HTML links the PNGs beside it),
- ``history.png`` (optimization history), ``importance.png`` (fANOVA parameter importances),
  ``curves.png`` (learning curves of the top trials), ``stage1.png`` (stage-1 reuse).

History and importances come from an in-memory Optuna study rebuilt from the trials' final
objective values, so they work whatever study storage the search used. The transfer-gain table
compares the best configuration (finetuned from stage 1) with the same configuration trained
from scratch on the targets for the same number of finetune epochs; that scratch run is stored
under ``<experiment>/baseline/`` and ``--baseline`` trains it (:mod:`dtlray.baseline`) when it
is missing.

Modules, in the order the report uses them:

- :mod:`~dtlray.report.records`: the experiment's trials as records;
- :mod:`~dtlray.report.study`: the Optuna study rebuilt from them, and fANOVA importances;
- :mod:`~dtlray.report.transfer`: stage-1 reuse and the transfer gain over the baseline;
- :mod:`~dtlray.report.plots`: the PNGs;
- :mod:`~dtlray.report.document`: blocks rendered to Markdown and HTML;
- :mod:`~dtlray.report.sections`: the sections and :func:`build_report`;
- :mod:`~dtlray.report.cli`: the ``dtlray report`` subcommand.

Importing the package is cheap (no Ray, Optuna, torch or matplotlib): ``dtlray --help`` and
``dtlray check`` load it to register the subcommand.
"""

from __future__ import annotations

from dtlray.report.cli import add_parser, main_args
from dtlray.report.sections import build_report

__all__ = ["add_parser", "build_report", "main_args"]
