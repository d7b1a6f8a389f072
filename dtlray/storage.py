"""Local paths and object-storage URIs behind one ``pyarrow.fs`` interface, with clear errors.

Data roots, results and the stage-1 cache may each be a local path or a URI that ``pyarrow.fs``
understands (``s3://bucket/prefix``, ``gs://...``). On S3 the standard AWS environment applies as
pyarrow's AWS SDK reads it: ``AWS_ENDPOINT_URL`` (an S3-compatible server), credentials from the
environment, ``~/.aws`` or the instance profile, ``AWS_DEFAULT_REGION``.

:func:`check_location` turns the three usual ways a URI fails — a bucket that does not exist, an
endpoint nothing answers, no usable credentials — into one line each that names the fix, instead
of an SDK error deep in a run. Importing this module is cheap: no torch, no Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dtlray.errors import DtlrayError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def is_uri(path: str) -> bool:
    """Whether ``path`` is a URI (``s3://...``) rather than a local path."""
    return "://" in str(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow`` filesystem of a local path or URI, and the path inside it.

    Raises:
        DtlrayError: a URI whose scheme ``pyarrow.fs`` does not know.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DtlrayError(
            f"cannot use {path}: {err} (use a local path or a URI such as s3://BUCKET/PREFIX)"
        ) from None


def join(location: str, *parts: str) -> str:
    """``location`` (path or URI) with ``parts`` appended, ``/``-separated."""
    return "/".join([str(location).rstrip("/"), *parts])


def check_location(location: str) -> None:
    """Fail fast, with one clear line, when a URI's bucket or endpoint cannot be used.

    Local paths pass unchecked (their errors are already clear). For a URI this asks for the
    bucket once: a few seconds at most when the endpoint does not answer (the SDK's retries).

    Raises:
        DtlrayError: the bucket does not exist, the endpoint does not answer, or access is
            refused (the message says whether credentials were found).
    """
    import pyarrow.fs as pafs

    if not is_uri(location):
        return
    fs, inner = filesystem(location)
    bucket = inner.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise storage_error(location, err) from None
    if info.type == pafs.FileType.NotFound:
        raise DtlrayError(
            f"{location}: bucket {bucket!r} does not exist{_endpoint_text()}: create it (e.g. "
            f"`aws s3 mb s3://{bucket}`) or fix the URI"
        )


def storage_error(location: str, err: OSError) -> DtlrayError:
    """One line for an object-storage ``OSError`` on ``location``: what failed and the fix."""
    text = str(err)
    scheme = str(location).split("://", 1)[0]
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        return DtlrayError(
            f"{location}: cannot reach the object store{_endpoint_text()} ({_first_line(text)}): "
            "check the network, or AWS_ENDPOINT_URL for an S3-compatible server"
        )
    if "NO_SUCH_BUCKET" in text:
        bucket = location.split("://", 1)[1].split("/", 1)[0]
        return DtlrayError(
            f"{location}: bucket {bucket!r} does not exist{_endpoint_text()}: create it or fix "
            "the URI"
        )
    if scheme == "s3" and not has_aws_credentials():
        return DtlrayError(
            f"{location}: the object store refused the request and no AWS credentials were "
            "found (none of AWS_ACCESS_KEY_ID, AWS_PROFILE, a web identity or container token, "
            "~/.aws/credentials): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            f"AWS_PROFILE ({_first_line(text)})"
        )
    if "ACCESS_DENIED" in text or "403" in text:
        return DtlrayError(
            f"{location}: access denied{_endpoint_text()} ({_first_line(text)}): check that the "
            "credentials in use may read and write this bucket"
        )
    return DtlrayError(f"{location}: {_first_line(text)}")


def has_aws_credentials() -> bool:
    """Whether the environment or ``~/.aws`` names AWS credentials (the instance profile of an
    EC2 machine cannot be seen from here and counts as none)."""
    if any(os.environ.get(name) for name in _CREDENTIAL_VARIABLES):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    return Path(shared).expanduser().is_file()


def _endpoint_text() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at {endpoint}" if endpoint else ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
