"""Reports of experiments on object storage: read a local mirror, write the report back.

The report reads an experiment's small records (``space.json``, ``best.json``, each trial's
``params.json``, ``result.json`` and ``error.txt``, Tune's state) many times over, so
:func:`fetch_records` copies them (never the checkpoints) into a local mirror first, updating
only what changed since the last fetch. :func:`publish` uploads what the report wrote —
``report/``, the baseline's records, ``best.json`` — back beside the experiment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dtlray.errors import DtlrayError
from dtlray.experiment import BASELINE_DIR, BEST_FILE, REPORT_DIR
from dtlray.storage import check_location, filesystem, join, list_files, storage_error

log = logging.getLogger(__name__)

MIRROR_ROOT = Path("~/.cache/dtlray/experiments")
"""Local mirrors of remote experiments: ``<MIRROR_ROOT>/<scheme>/<bucket>/<path>``."""


def mirror_path(uri: str) -> Path:
    """Where the local mirror of the experiment at ``uri`` lives."""
    scheme, rest = uri.rstrip("/").split("://", 1)
    return MIRROR_ROOT.expanduser() / scheme / rest


def fetch_records(uri: str) -> Path:
    """Copy the experiment's records (not its checkpoints) into its local mirror; return it.

    Raises:
        DtlrayError: the bucket, endpoint or credentials do not work, or nothing is at ``uri``.
    """
    check_location(uri)
    fs, inner = filesystem(uri)
    local = mirror_path(uri)
    files = {path: entry for path, entry in list_files(uri).items() if _is_record(path)}
    if not files:
        raise DtlrayError(
            f"no experiment at {uri}: pass <storage-path>/<name> as printed by dtlray tune"
        )
    fetched = 0
    try:
        for relative, entry in files.items():
            target = local / relative
            stamp = entry.mtime_ns or 0
            if _same(target, entry.size, stamp):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(entry.path) as source:
                partial = target.with_name(f".{target.name}.part")
                partial.write_bytes(source.read())
            os.utime(partial, ns=(stamp, stamp))  # the next fetch skips it while unchanged
            partial.replace(target)
            fetched += 1
    except OSError as err:
        raise storage_error(uri, err) from None
    log.info("report: %d of %d records fetched from %s into %s", fetched, len(files), uri, local)
    return local


def publish(local: Path, uri: str) -> None:
    """Upload the report, the baseline's records and ``best.json`` from the mirror to ``uri``.

    Raises:
        DtlrayError: the upload failed (one line naming the location).
    """
    fs, inner = filesystem(uri)
    outputs = [local / BEST_FILE, *sorted((local / REPORT_DIR).rglob("*"))]
    outputs += sorted((local / BASELINE_DIR).glob("*.json"))
    try:
        for path in outputs:
            if not path.is_file():
                continue
            relative = path.relative_to(local).as_posix()
            with fs.open_output_stream(f"{inner}/{relative}") as sink:
                sink.write(path.read_bytes())
    except OSError as err:
        raise storage_error(join(uri, REPORT_DIR), err) from None


def _same(local: Path, size: int, mtime_ns: int) -> bool:
    if not local.is_file():
        return False
    stat = local.stat()
    return stat.st_size == size and stat.st_mtime_ns == mtime_ns


def _is_record(relative: str) -> bool:
    """Whether an experiment file is a record the report reads (checkpoints are not)."""
    parts = relative.split("/")
    return not any(part.startswith("checkpoint_") for part in parts) and parts[0] != REPORT_DIR
