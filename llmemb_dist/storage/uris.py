"""URIs and the clients behind them: a local path or `s3://bucket/prefix`, and the errors every storage call raises.

S3 endpoint, credentials and region come from the standard AWS variables, so MinIO and other
S3-compatible stores work.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

# Seconds, so an unreachable endpoint fails fast instead of hanging on retries.
S3_CONNECT_TIMEOUT = 3
S3_REQUEST_TIMEOUT = 30
S3_MAX_ATTEMPTS = 2


class StorageError(IOError):
    """Storage cannot be reached or read; the message names the URI."""


class DataError(ValueError):
    """Input data that breaks a contract; the message names the file, row or field."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` below it; a part that would climb out of it ('..') is refused."""
    out = uri.rstrip("/")
    for part in parts:
        if ".." in part.split("/"):
            raise StorageError(f"{part!r} would leave {uri!r}: a '..' segment is not allowed in a name")
        out = f"{out}/{part.strip('/')}"
    return out


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a URI."""
    if "://" in uri and not is_s3(uri) and not uri.startswith("file://"):
        raise StorageError(f"unknown URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket")
        return s3_filesystem(), path
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = dict(
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=S3_CONNECT_TIMEOUT,
        request_timeout=S3_REQUEST_TIMEOUT,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    return pafs.S3FileSystem(**kwargs)


def s3_client():
    """boto3, for what pyarrow lacks: conditional writes."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint(),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=BotoConfig(
            connect_timeout=S3_CONNECT_TIMEOUT,
            read_timeout=S3_REQUEST_TIMEOUT,
            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        ),
    )


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


@contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except (StorageError, DataError, FileNotFoundError):
        raise
    except OSError as e:
        raise StorageError(f"storage error at {uri}: {e}") from e
