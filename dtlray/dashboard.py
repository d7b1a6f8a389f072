"""``dtlray dashboard EXPERIMENT``: optuna-dashboard on the study a search mirrors beside it.

Every ``dtlray tune`` on local storage keeps its Optuna study in ``<experiment>/optuna.db``
(SQLite), written live as trials finish; the dashboard reads it while the search runs or after.
It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dtlray.errors import DtlrayError
from dtlray.experiment import STUDY_FILE, ExperimentDir
from dtlray.ray_session import free_port


def find_study(experiment: str | Path) -> str:
    """The study URL of ``experiment``.

    Raises:
        DtlrayError: no such experiment, or it has no study file (says why and what to do).
    """
    path = Path(experiment).expanduser()
    if not path.is_dir():
        raise DtlrayError(
            f"no experiment at {str(path)!r}; pass the experiment directory "
            "(<storage-path>/<name>, printed by dtlray tune)"
        )
    exp = ExperimentDir(str(path.resolve()))
    if not exp.has_study():
        raise DtlrayError(
            f"{path} has no {STUDY_FILE}: it is not a dtlray search on local storage, or it "
            "was run with --study-storage (then run optuna-dashboard on that URL)"
        )
    return exp.study_url


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dtlray dashboard``."""
    p = subparsers.add_parser(
        "dashboard",
        help="open optuna-dashboard on a search's study (while it runs or after)",
        description="Serve optuna-dashboard on EXPERIMENT/optuna.db: trials, parameters, "
        "values, importances. Listens on 127.0.0.1 on a free port unless told otherwise.",
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="<storage-path>/<name>")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.set_defaults(handler=_cmd_dashboard)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    url = find_study(args.experiment)
    port = args.port or free_port(args.host)
    print(f"optuna-dashboard for {args.experiment}: http://{args.host}:{port}/", flush=True)
    print("(Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(url, host=args.host, port=port)
    return 0
