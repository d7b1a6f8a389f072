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

import functools
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

    Filesystems of bucket URIs (``s3://``, ``gs://``) are made once per bucket and environment:
    pyarrow asks S3 for a bucket's region each time it makes one, a request per call otherwise.

    Args:
        path: A local path or a URI.

    Returns:
        ``(filesystem, path inside it)``.

    Raises:
        DtlrayError: a URI whose scheme ``pyarrow.fs`` does not know, with query parameters, or
            whose store cannot be reached (one line, see :func:`storage_error`).
    """
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if "?" in path:
        raise DtlrayError(
            f"{path}: URIs with query parameters are not supported; set the endpoint with "
            "AWS_ENDPOINT_URL and the region with AWS_DEFAULT_REGION instead"
        )
    scheme, rest = path.split("://", 1)
    if scheme in BUCKET_SCHEMES:
        bucket = rest.split("/", 1)[0]
        environment = tuple(os.environ.get(name) for name in _FILESYSTEM_VARIABLES)
        return _bucket_filesystem(f"{scheme}://{bucket}", environment), rest.rstrip("/")
    return _from_uri(path)


BUCKET_SCHEMES = ("s3", "gs", "gcs")
"""URI schemes whose first path part is a bucket (:func:`check_location` asks for it)."""

# What decides a bucket filesystem besides its URI: a change makes a new one (tests change them).
_FILESYSTEM_VARIABLES = (
    *_CREDENTIAL_VARIABLES,
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(bucket_uri: str, _environment: tuple[str | None, ...]) -> pafs.FileSystem:
    return _from_uri(bucket_uri)[0]


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DtlrayError(
            f"cannot use {uri}: {err} (use a local path or a URI such as s3://BUCKET/PREFIX)"
        ) from None
    except OSError as err:  # e.g. S3's region lookup of the bucket failed
        raise storage_error(uri, err) from None


def join(location: str, *parts: str) -> str:
    """``location`` (path or URI) with ``parts`` appended, ``/``-separated."""
    return "/".join([str(location).rstrip("/"), *parts])


def list_files(location: str, *, recursive: bool = True) -> dict[str, pafs.FileInfo]:
    """The files under ``location`` (path or URI), by path relative to it; none if it is absent.

    Raises:
        DtlrayError: the store failed (one line, see :func:`storage_error`).
    """
    import pyarrow.fs as pafs

    fs, inner = filesystem(location)
    selector = pafs.FileSelector(inner, recursive=recursive, allow_not_found=True)
    try:
        entries = fs.get_file_info(selector)
    except OSError as err:
        raise storage_error(location, err) from None
    return {
        entry.path[len(inner.rstrip("/")) + 1 :]: entry
        for entry in entries
        if entry.type == pafs.FileType.File
    }


def check_location(location: str) -> None:
    """Fail fast, with one clear line, when a URI's bucket or endpoint cannot be used.

    Local paths, and URIs without buckets, pass unchecked (their errors are already clear). For
    a bucket URI this asks for the bucket once (a few seconds at most when the endpoint does not
    answer: the SDK's retries); where that is refused, for the location itself (a role may read
    a prefix of a bucket it may not list).

    Args:
        location: A local path or a URI.

    Raises:
        DtlrayError: the bucket does not exist, the endpoint does not answer, or access is
            refused (the message says whether credentials were found).
    """
    import pyarrow.fs as pafs

    if not is_uri(location) or location.split("://", 1)[0] not in BUCKET_SCHEMES:
        return
    fs, inner = filesystem(location)
    bucket = inner.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        if not _is_refusal(str(err)):
            raise storage_error(location, err) from None
        try:
            fs.get_file_info(inner)
            return
        except OSError:
            raise storage_error(location, err) from None
    if info.type == pafs.FileType.NotFound:
        raise DtlrayError(
            f"{location}: bucket {bucket!r} does not exist{_endpoint_text()}: create it (e.g. "
            f"`aws s3 mb s3://{bucket}`) or fix the URI"
        )


def storage_error(location: str, err: OSError) -> DtlrayError:
    """One line for an object-storage ``OSError`` on ``location``: what failed and the fix.

    Args:
        location: The path or URI the failed operation was on.
        err: The error pyarrow raised.

    Returns:
        The error to raise. On S3 with no credentials in sight, a refusal or an error the store
        answered says so (an EC2 instance profile, which cannot be seen from here, may still
        supply them).
    """
    text = str(err)
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
    answered = "HTTP status" in text or _is_refusal(text)
    if location.startswith("s3://") and answered and not has_aws_credentials():
        return DtlrayError(
            f"{location}: the object store refused the request ({_first_line(text)}) and no AWS "
            "credentials were found (none of AWS_ACCESS_KEY_ID, AWS_PROFILE, a web identity or "
            "container token, ~/.aws/credentials): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or check the instance profile on EC2"
        )
    if _is_refusal(text):
        return DtlrayError(
            f"{location}: access denied{_endpoint_text()} ({_first_line(text)}): check that the "
            "credentials in use may read and write this location"
        )
    return DtlrayError(f"{location}: {_first_line(text)}")


def _is_refusal(text: str) -> bool:
    """Whether an SDK error message says the store refused the credentials or the request."""
    return any(
        marker in text
        for marker in (
            "ACCESS_DENIED",
            "AccessDenied",
            "HTTP status 403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
        )
    )


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
