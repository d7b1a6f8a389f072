"""Stage-1 results stored under the storage path, keyed by a hash of what changes them.

Layout: ``<storage_path>/_stage1/<key>/{trunk.pt, record.json}``. ``record.json`` is written last
and is the completion marker: a directory without it is never read as a result, so a trial that
dies mid-write leaves nothing that looks whole. Paths may be local or URIs that ``pyarrow.fs``
understands (``s3://``, ``gs://``), so a cluster shares one cache through object storage.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from dtlray.experiment import filesystem, stage1_cache_root

TRUNK_FILE = "trunk.pt"
RECORD_FILE = "record.json"


@dataclass(frozen=True)
class Stage1Record:
    """What a stored stage-1 result says about itself."""

    source_val_acc: float
    seconds: float  # what computing it cost
    config: dict[str, Any]  # the trial config that built the trunk (it rebuilds its own model)


def stage1_dir(storage_path: str, key: str) -> str:
    """Where the stage-1 result with ``key`` lives under ``storage_path``."""
    return f"{stage1_cache_root(storage_path)}/{key}"


def has_stage1(path: str) -> bool:
    """Whether a complete stage-1 result is stored at ``path``."""
    fs, root = filesystem(path)
    return fs.get_file_info(f"{root}/{RECORD_FILE}").type == pafs.FileType.File


def save_stage1(path: str, trunk_state: dict[str, torch.Tensor], record: Stage1Record) -> None:
    """Store a stage-1 result; the record goes last so a partial write is never read."""
    fs, root = filesystem(path)
    buffer = io.BytesIO()
    torch.save(trunk_state, buffer)
    if isinstance(fs, pafs.LocalFileSystem):
        # Local: build beside the target and rename into place, so even the trunk appears whole.
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(root)}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        with open(os.path.join(tmp, TRUNK_FILE), "wb") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(tmp, RECORD_FILE), "w") as f:
            json.dump(asdict(record), f, indent=1)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another trial stored the same key first: theirs is equivalent; keep it.
            shutil.rmtree(tmp)
        return
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{TRUNK_FILE}") as f:
        f.write(buffer.getvalue())
    with fs.open_output_stream(f"{root}/{RECORD_FILE}") as f:
        f.write(json.dumps(asdict(record), indent=1).encode())


def load_stage1(path: str) -> tuple[dict[str, torch.Tensor], Stage1Record]:
    """Load a stored stage-1 trunk (``weights_only=True``) and its record."""
    fs, root = filesystem(path)
    with fs.open_input_stream(f"{root}/{RECORD_FILE}") as f:
        record = Stage1Record(**json.loads(f.read()))
    with fs.open_input_stream(f"{root}/{TRUNK_FILE}") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
    return state, record
