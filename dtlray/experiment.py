"""What an experiment is on storage — the one module that spells its paths and file names.

An experiment is ``<storage path>/<name>``: a Ray Tune experiment directory (local or a URI that
``pyarrow.fs`` understands) to which dtlray adds

- ``space.json``: the space **as started**, with every ``--set``, ``--num-samples`` and other
  override applied. It is the single source of truth for everything that runs after the start:
  ``--resume``, the best-trial summary and ``best.json``, ``dtlray report`` and its baseline;
- ``best.json``: the chosen trial, its validation and test accuracy;
- ``.dtlray-running``: pid and host while ``dtlray tune`` runs (local storage only);
- ``optuna.db``: the mirrored Optuna study (local storage only);
- ``baseline/`` and ``report/``: written by ``dtlray report``.

The stage-1 cache lives beside the experiments, at ``<storage path>/_stage1``, so searches on
the same storage share it. Importing this module is cheap: no torch, no Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlray.errors import DtlrayError
from dtlray.storage import check_location, filesystem, is_uri

if TYPE_CHECKING:
    from dtlray.search_space import SearchSpace

log = logging.getLogger(__name__)

DEFAULT_STORAGE_PATH = "~/dtlray_results"
SPACE_FILE = "space.json"
BEST_FILE = "best.json"
PREDICTIONS_FILE = "test_predictions.json"  # the best trial's test predictions, per image
RUNNING_FILE = ".dtlray-running"
STUDY_FILE = "optuna.db"
BASELINE_DIR = "baseline"
REPORT_DIR = "report"
STAGE1_CACHE_DIR = "_stage1"


def resolve_storage_path(path: str | None) -> str:
    """The storage path: ``path``, else ``$DTLRAY_STORAGE_PATH``, else ``~/dtlray_results``.

    Local paths come back absolute (Ray Train rejects relative storage paths); URIs unchanged,
    once their bucket answers (:func:`~dtlray.storage.check_location`).

    Raises:
        DtlrayError: a URI whose bucket, endpoint or credentials do not work (one line).
    """
    path = path or os.environ.get("DTLRAY_STORAGE_PATH") or DEFAULT_STORAGE_PATH
    if is_uri(path):
        check_location(path)  # a missing bucket or a dead endpoint: one line now, not in Ray
        return path
    return str(Path(path).expanduser().resolve())


def default_name(space_name: str | None, prefix: str = "") -> str:
    """``[<prefix>-]<space name>-<YYYYmmdd-HHMMSS>``: a new experiment's default name."""
    stem = space_name or ("space" if prefix else "search")
    return f"{prefix + '-' if prefix else ''}{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def stage1_cache_root(storage_path: str) -> str:
    """Where stage-1 results of every experiment on ``storage_path`` are kept."""
    return f"{storage_path.rstrip('/')}/{STAGE1_CACHE_DIR}"


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Write JSON so no reader ever sees half of it.

    Local: a temporary file beside the target, renamed into place. Object storage: one PUT,
    which the store makes visible only once complete.
    """
    text = json.dumps(payload, indent=2, default=str)
    if is_uri(path):
        fs, inner = filesystem(path)
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def read_json(path: str) -> Any:
    """Read a JSON file (local path or URI).

    Raises:
        DtlrayError: it cannot be read or is not JSON (names the file).
    """
    try:
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as err:
        raise DtlrayError(f"cannot read {path}: {err}") from None


def exists(path: str) -> bool:
    """Whether a file exists at ``path`` (local path or URI)."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class ExperimentDir:
    """One experiment's place on storage and the files dtlray keeps there.

    Attributes:
        path: the experiment directory, ``<storage path>/<name>`` (absolute local path or URI).
    """

    path: str

    @classmethod
    def at(cls, storage_path: str | None, name: str) -> ExperimentDir:
        """The experiment ``name`` under ``storage_path`` (resolved as the CLI resolves it)."""
        return cls(f"{resolve_storage_path(storage_path).rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        """The experiment's name (the last path component)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def storage_path(self) -> str:
        """The storage path the experiment lives under."""
        return self.path.rstrip("/").rsplit("/", 1)[0]

    @property
    def is_local(self) -> bool:
        """Whether the experiment is on the local filesystem."""
        return not is_uri(self.path)

    def file(self, name: str) -> str:
        """The path of ``name`` inside the experiment."""
        return f"{self.path.rstrip('/')}/{name}"

    # -- the space as started ------------------------------------------------------------------

    def write_space(self, space: SearchSpace) -> None:
        """Store the space as started (every override applied)."""
        write_json(self.file(SPACE_FILE), space.model_dump(mode="json"))

    def has_space(self) -> bool:
        """Whether the experiment stored its started space (dtlray 0.1 searches may not)."""
        return exists(self.file(SPACE_FILE))

    def read_space(self) -> SearchSpace:
        """The space as the search was started: the one to resume, summarise and report on.

        Raises:
            DtlrayError: the experiment has no ``space.json`` or it is not a valid space.
        """
        from dtlray.search_space import parse_space

        path = self.file(SPACE_FILE)
        if not exists(path):
            raise DtlrayError(
                f"{self.path} has no {SPACE_FILE}: it was not started by dtlray tune (or by a "
                "version that did not record its space); start a new search instead"
            )
        return parse_space(read_json(path), source=path)

    # -- best.json -----------------------------------------------------------------------------

    def write_best(self, summary: Mapping[str, Any]) -> None:
        """Store the best-trial summary as ``best.json``."""
        write_json(self.file(BEST_FILE), summary)

    def write_predictions(self, trial_id: str | None, tasks: Mapping[str, Any]) -> None:
        """Store the best trial's per-image test predictions (task -> ``{label, pred}``)."""
        write_json(
            self.file(PREDICTIONS_FILE), {"trial_id": trial_id, "split": "test", "tasks": tasks}
        )

    def read_predictions(self, trial_id: str | None) -> dict[str, Any] | None:
        """The stored test predictions of ``trial_id``; None if none are, or another trial's."""
        path = self.file(PREDICTIONS_FILE)
        if not exists(path):
            return None
        stored = read_json(path)
        return stored["tasks"] if stored.get("trial_id") == trial_id else None

    def read_best(self) -> dict[str, Any] | None:
        """``best.json``, or None when the search has not written it (yet)."""
        path = self.file(BEST_FILE)
        return read_json(path) if exists(path) else None

    # -- the study, the baseline, the report ---------------------------------------------------

    @property
    def study_url(self) -> str:
        """SQLAlchemy URL of the mirrored Optuna study (local experiments only)."""
        return f"sqlite:///{Path(self.path).resolve() / STUDY_FILE}"

    def has_study(self) -> bool:
        """Whether the mirrored Optuna study file exists."""
        return self.is_local and (Path(self.path) / STUDY_FILE).is_file()

    @property
    def baseline_dir(self) -> str:
        """Where ``dtlray report`` keeps the scratch baseline."""
        return self.file(BASELINE_DIR)

    @property
    def report_dir(self) -> str:
        """Where ``dtlray report`` writes the report."""
        return self.file(REPORT_DIR)

    # -- the running marker --------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold ``.dtlray-running`` (pid, host) while a search runs (local storage only), so
        ``dtlray report`` can refuse a half-finished experiment."""
        if not self.is_local:
            yield
            return
        marker = Path(self.file(RUNNING_FILE))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def check_not_running(self) -> None:
        """Refuse an experiment that ``dtlray tune`` is still running (its marker names a live
        process); a marker left by a killed search is ignored with a warning.

        Raises:
            DtlrayError: the search still runs here, or runs on another host.
        """
        marker = Path(self.file(RUNNING_FILE))
        if not self.is_local or not marker.is_file():
            return
        try:
            owner = json.loads(marker.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("dtlray report: ignoring unreadable %s (%s)", marker, err)
            return
        if host != socket.gethostname():
            # Another machine's process table is out of reach: trust the marker, say how to clear.
            raise DtlrayError(
                f"experiment {self.path!r} is still running on host {host} (pid {pid}, per "
                f"{marker}); wait for dtlray tune to finish, or delete that file if that run "
                "is gone"
            )
        if pid_alive(pid):
            raise DtlrayError(
                f"experiment {self.path!r} is still running (dtlray tune, pid {pid}); wait for it "
                "to finish (it writes best.json at the end), then run dtlray report again"
            )
        log.warning(
            "dtlray report: %s names pid %d, which no longer runs (a killed search?); reporting "
            "what the experiment holds",
            marker,
            pid,
        )
