"""Shared fixtures. Ray is not started here: tests that need it start their own local cluster."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtlray.data import BUILTIN_DATASETS, prepare_builtin

RAY_FORWARDED_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet|[\w.]*\s*pid=\d+)[^)]*\)")
"""A line Ray's log monitor forwards to the driver from another process, e.g. ``(raylet) …``."""


def own_stderr(err: str) -> str:
    """What the command itself wrote to stderr, without the lines a Ray cluster forwards.

    The integration tests keep one Ray up for the whole session, and its raylet writes to this
    process's stderr whenever it likes (a nearly full disk: "… is over 95% full"); a check that a
    command failed with one line must not count those.
    """
    return "".join(
        line for line in err.splitlines(keepends=True) if not RAY_FORWARDED_LINE.match(line)
    )


def one_error_line(err: str) -> str:
    """Assert that a command's own stderr is one ``dtlray: error: ...`` line; return it."""
    err = own_stderr(err)
    assert err.startswith("dtlray: error: ") and err.count("\n") == 1, err
    return err


DATA_ROOT_LIMIT = 1300
"""Rows per split of the datasets in :func:`data_root` (seed 0): ``digits`` (1,257 train rows)
and ``faces`` stay whole. Every stage 1 a test computes validates on the source's val split each
epoch, so its size is paid across the suite: 1,300 rows hold tiny.yaml's 1,024 source rows."""


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with every built-in dataset prepared, at most 1,300 rows per split (seed 0).

    ``digits`` and ``faces`` are whole (1,797 and 200 rows); ``fashion-mnist`` has 1,300 rows in
    each of train, val and test. Treat it as read-only: other tests share it.
    """
    root = tmp_path_factory.mktemp("dtlray-data")
    for name in BUILTIN_DATASETS:
        prepare_builtin(name, root, seed=0, limit=DATA_ROOT_LIMIT)
    return root


@dataclass(frozen=True)
class S3Server:
    """A real S3-protocol server (``moto_server``) on loopback that checks credentials.

    ``env`` is what a client needs: the endpoint, this server's access key and a region, and no
    path to any real AWS configuration (``~/.aws`` and the instance metadata service are off).
    """

    endpoint: str
    env: dict[str, str]

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; return ``s3://name``."""
        import boto3

        boto3.client("s3", **self._client_args()).create_bucket(Bucket=name)
        return f"s3://{name}"

    def _client_args(self) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint,
            "region_name": self.env["AWS_DEFAULT_REGION"],
            "aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
        }


# Requests moto serves before it starts to check credentials: the four IAM calls that make
# the test user and its key.
_S3_UNAUTHENTICATED_CALLS = 4


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Start ``moto_server`` on a free loopback port with authentication on; stop it at the end.

    No real AWS credential is involved: the access key is one the server itself issued.
    """
    import boto3

    executable = Path(sys.executable).with_name("moto_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto_server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [str(executable), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_S3_UNAUTHENTICATED_CALLS)},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (see {log.name})") from None
                time.sleep(0.2)
        bootstrap = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "bootstrap",
            "aws_secret_access_key": "bootstrap",
        }
        iam = boto3.client("iam", **bootstrap)
        iam.create_user(UserName="dtlray-tests")
        policy = iam.create_policy(
            PolicyName="everything",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        iam.attach_user_policy(UserName="dtlray-tests", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="dtlray-tests")["AccessKey"]
        nowhere = str(tmp_path_factory.mktemp("no-aws") / "absent")
        yield S3Server(
            endpoint=endpoint,
            env={
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                "AWS_CONFIG_FILE": nowhere,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` with its environment set in this process (and no other AWS variables)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
