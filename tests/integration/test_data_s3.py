"""Data roots on object storage, against a real S3-protocol server on loopback (``moto_server``).

Prepare, list, load, validate and read ``s3://`` roots; a prepare killed half-way leaves nothing
that looks whole; bad buckets, endpoints and credentials fail with one line each, quickly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dtlray.cli import main
from dtlray.data import load_info, prepare_builtin, read_split_table, validate_split
from dtlray.errors import DtlrayError
from tests.conftest import S3Server, one_error_line

BAD_INPUT_SECONDS = 30  # the bound on each bad-input failure


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def fail_fast(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """A user error: exit 2, one line on stderr, no traceback, within the time bound."""
    start = time.monotonic()
    code, out, err = run(argv, capsys)
    assert time.monotonic() - start < BAD_INPUT_SECONDS
    assert code == 2, (out, err)
    return one_error_line(err)


def objects(uri: str) -> list[str]:
    fs, inner = pafs.FileSystem.from_uri(uri)
    selector = pafs.FileSelector(inner, recursive=True, allow_not_found=True)
    return sorted(
        info.path[len(inner) + 1 :]
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    )


def test_prepare_list_load_read_on_s3(
    s3_env: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = s3_env.create_bucket("prepare-list")
    root = f"{bucket}/data"
    code, out, _ = run(["data", "prepare", "digits", "--root", root], capsys)
    assert code == 0 and out.startswith("prepared digits: 1,797 rows"), out
    assert f"in {root}/digits" in out
    assert objects(f"{root}/digits") == [
        "dataset.json",
        "test/part-00000.parquet",
        "train/part-00000.parquet",
        "val/part-00000.parquet",
    ]
    code, out, _ = run(["data", "prepare", "digits", "--root", root], capsys)
    assert code == 0 and out.startswith("reusing digits"), out
    code, out, _ = run(["data", "list", "--root", root], capsys)
    assert code == 0 and f"datasets in {root}:" in out and "digits" in out, out

    # The same bytes as a local prepare: equal fingerprints, equal tables.
    remote = load_info("digits", root)
    local = prepare_builtin("digits", tmp_path)
    assert remote.fingerprint == local.fingerprint
    assert remote.path == f"{root}/digits"
    for split in ("train", "val", "test"):
        assert read_split_table(remote, split).equals(read_split_table(local, split))


def test_changed_shard_on_s3_is_caught_by_its_size(s3_env: S3Server) -> None:
    root = f"{s3_env.create_bucket('tampered')}/data"
    info = prepare_builtin("faces", root)
    validate_split(info, "train")  # one LIST: sizes agree
    fs, inner = pafs.FileSystem.from_uri(info.split_files("train")[0])
    table = pq.read_table(inner, filesystem=fs).slice(0, 10)
    pq.write_table(table, inner, filesystem=fs)  # a different, smaller shard
    with pytest.raises(DtlrayError, match=r"train/part-00000.parquet has \d+ bytes but .*--force"):
        validate_split(load_info("faces", root), "train")


def test_force_and_foreign_files(s3_env: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    root = f"{s3_env.create_bucket('force')}/data"
    assert run(["data", "prepare", "faces", "--root", root], capsys)[0] == 0
    err = fail_fast(["data", "prepare", "faces", "--root", root, "--seed", "3"], capsys)
    assert "other arguments" in err and "--force" in err
    code, out, _ = run(
        ["data", "prepare", "faces", "--root", root, "--seed", "3", "--force"], capsys
    )
    assert code == 0 and out.startswith("prepared faces"), out
    assert load_info("faces", root).provenance.seed == 3

    other = f"{root}-other"
    fs, inner = pafs.FileSystem.from_uri(f"{other}/faces/notes.txt")
    with fs.open_output_stream(inner) as handle:
        handle.write(b"not a dataset")
    for force in (False, True):
        with pytest.raises(DtlrayError, match="not a dtlray dataset's .*notes.txt.*move them"):
            prepare_builtin("faces", other, force=force)
    assert objects(f"{other}/faces") == ["notes.txt"]  # left as it was

    # A damaged dataset.json: refused as invalid, and --force replaces it.
    fs, inner = pafs.FileSystem.from_uri(f"{root}/faces/dataset.json")
    with fs.open_output_stream(inner) as handle:
        handle.write(b"{not json")
    err = fail_fast(["data", "prepare", "faces", "--root", root], capsys)
    assert "is not a valid dataset description" in err and "--force" in err, err
    assert run(["data", "prepare", "faces", "--root", root, "--force"], capsys)[0] == 0
    assert load_info("faces", root).provenance.seed == 0


def test_prepare_killed_half_way_leaves_nothing_that_looks_whole(
    s3_env: S3Server, tmp_path: Path
) -> None:
    root = f"{s3_env.create_bucket('killed')}/data"
    command = [sys.executable, "-m", "dtlray", "data", "prepare", "fashion-mnist", "--root", root]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stderr is not None
    for line in process.stderr:  # kill it right after its first shard is uploaded
        if "train shard 1/" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    left = objects(f"{root}/fashion-mnist")
    assert left and "dataset.json" not in left  # shards, but nothing that looks whole
    with pytest.raises(DtlrayError, match="'fashion-mnist' is not prepared in s3://killed/data"):
        load_info("fashion-mnist", root)
    info = prepare_builtin("fashion-mnist", root, limit=500)  # clears the leftovers, then writes
    assert info.splits == {"train": 500, "val": 500, "test": 500}
    assert "dataset.json" in objects(f"{root}/fashion-mnist")
    for split in ("train", "val", "test"):
        validate_split(info, split, footers=True, check_hashes=True)


def test_missing_bucket(s3_env: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["data", "prepare", "digits", "--root", "s3://no-such-bucket/data"],
        ["data", "list", "--root", "s3://no-such-bucket/data"],
    ):
        err = fail_fast(argv, capsys)
        assert "bucket 'no-such-bucket' does not exist" in err and s3_env.endpoint in err, err
    with pytest.raises(DtlrayError, match="bucket 'no-such-bucket' does not exist"):
        load_info("digits", "s3://no-such-bucket/data")
    # Results on a missing bucket: refused before Ray starts.
    for command in ("train", "tune"):
        argv = [command, "search_spaces/tiny.yaml", "--storage-path", "s3://no-such-bucket/runs"]
        assert "bucket 'no-such-bucket' does not exist" in fail_fast(argv, capsys)


def test_endpoint_nothing_answers(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    err = fail_fast(["data", "prepare", "digits", "--root", "s3://any/data"], capsys)
    assert f"cannot reach the object store at {dead}" in err and "AWS_ENDPOINT_URL" in err, err


def test_real_aws_unreachable(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an endpoint override pyarrow asks AWS for the bucket's region first: with no
    network to AWS (as here), that fails too, with the same one line."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    err = fail_fast(["data", "list", "--root", "s3://dtlray-no-network/data"], capsys)
    assert "cannot reach the object store" in err, err


def test_missing_credentials(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = s3_env.create_bucket("needs-keys")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = fail_fast(["data", "list", "--root", f"{bucket}/data"], capsys)
    assert "no AWS credentials were found" in err and "AWS_ACCESS_KEY_ID" in err, err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key-this-server-issued")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    err = fail_fast(["data", "prepare", "digits", "--root", f"{bucket}/data"], capsys)
    assert "access denied" in err and "credentials" in err, err
