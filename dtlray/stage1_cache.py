"""Stage-1 results stored under the storage path, keyed by a hash of what changes them.

Layout: ``<storage_path>/_stage1/<key>/{trunk.pt, record.json}``, and for ``schedule: wsd`` the
stage tree: ``<storage_path>/_stage1/tree-<tree key>/constant-<steps>/{trunk.pt, record.json}``,
the full training state at the end of a constant phase, which a longer budget continues.
``record.json`` is written last and is the completion marker: a directory without it is never
read as a result, so a trial that dies mid-write leaves nothing that looks whole. Paths may be
local or URIs that ``pyarrow.fs`` understands (``s3://``, ``gs://``), so a cluster shares one
cache through object storage.
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

from dtlray.experiment import stage1_cache_root
from dtlray.storage import filesystem

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
    _save_whole(path, trunk_state, json.dumps(asdict(record), indent=1))


def _save_whole(path: str, state: dict[str, Any], record_json: str) -> None:
    """``TRUNK_FILE`` + ``RECORD_FILE`` at ``path``, never seen half-written."""
    fs, root = filesystem(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if isinstance(fs, pafs.LocalFileSystem):
        # Local: build beside the target and rename into place, so even the trunk appears whole.
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(root)}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        with open(os.path.join(tmp, TRUNK_FILE), "wb") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(tmp, RECORD_FILE), "w") as f:
            f.write(record_json)
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
        f.write(record_json.encode())


# -- the stage tree (schedule: wsd) ---------------------------------------------------------------


@dataclass(frozen=True)
class ConstantPhase:
    """A stored end of a stage-1 constant phase: what a longer budget continues from.

    Attributes:
        steps: constant-rate optimizer steps it holds (it may end mid-epoch).
        steps_per_epoch: the steps of one of its epochs (a run with other shard sizes or batch
            size cannot continue it).
        seconds: what computing them cost, in total (over every run that extended them).
        path: where it is stored.
    """

    steps: int
    steps_per_epoch: int
    seconds: float
    path: str

    @property
    def epochs(self) -> float:
        """The epochs it holds (a fraction when it ends mid-epoch)."""
        return self.steps / self.steps_per_epoch


def tree_dir(storage_path: str, tree_key: str) -> str:
    """Where a stage-1 configuration's constant phases (any budget) are stored."""
    return f"{stage1_cache_root(storage_path)}/tree-{tree_key}"


def save_constant_phase(
    tree: str, steps: int, steps_per_epoch: int, state: dict[str, Any], seconds: float
) -> None:
    """Store the model, optimizer, schedule and RNG state after ``steps`` constant-rate steps."""
    record = {"steps": steps, "steps_per_epoch": steps_per_epoch, "seconds": seconds}
    _save_whole(f"{tree}/{_CONSTANT_PREFIX}{steps:09d}", state, json.dumps(record))


def longest_constant_phase(
    tree: str, at_most: int, steps_per_epoch: int, whole_epochs: bool = False
) -> ConstantPhase | None:
    """The stored constant phase with the most steps, up to ``at_most``, of epochs of
    ``steps_per_epoch`` steps (and, with ``whole_epochs``, ending at an epoch's end); None if
    none is."""
    fs, root = filesystem(tree)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    best: ConstantPhase | None = None
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.base_name
        if not name.startswith(_CONSTANT_PREFIX) or not name[len(_CONSTANT_PREFIX) :].isdigit():
            continue
        steps = int(name[len(_CONSTANT_PREFIX) :])
        if steps > at_most or (best is not None and steps <= best.steps):
            continue
        if whole_epochs and steps % steps_per_epoch:
            continue
        if not has_stage1(f"{tree}/{name}"):  # its record is missing: not (yet) whole
            continue
        with fs.open_input_stream(f"{root}/{name}/{RECORD_FILE}") as f:
            record = json.loads(f.read())
        if record["steps_per_epoch"] != steps_per_epoch:
            continue
        best = ConstantPhase(steps, steps_per_epoch, float(record["seconds"]), f"{tree}/{name}")
    return best


def load_constant_phase(phase: ConstantPhase) -> dict[str, Any]:
    """The stored state (``weights_only=True``): ``model``, ``optimizer``, ``scheduler``,
    ``rng`` (torch's CPU generator state at that step)."""
    fs, root = filesystem(phase.path)
    with fs.open_input_stream(f"{root}/{TRUNK_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")


_CONSTANT_PREFIX = "constant-"


def load_stage1(path: str) -> tuple[dict[str, torch.Tensor], Stage1Record]:
    """Load a stored stage-1 trunk (``weights_only=True``) and its record."""
    fs, root = filesystem(path)
    with fs.open_input_stream(f"{root}/{RECORD_FILE}") as f:
        record = Stage1Record(**json.loads(f.read()))
    with fs.open_input_stream(f"{root}/{TRUNK_FILE}") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
    return state, record
