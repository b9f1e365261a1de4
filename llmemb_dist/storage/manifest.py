"""Reading a publication: its manifest, its pointer `_LATEST`, the transaction folder they name, and its
tables (see `publish` for the protocol and which path is safe to read while a new version is published)."""
from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from llmemb_dist.storage.files import exists, read_bytes
from llmemb_dist.storage.parquet import read_parquet_files
from llmemb_dist.storage.uris import DataError, StorageError, join

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = "llmemb-dist/1"
LATEST = "_LATEST"
TRANSACTION = re.compile(r"data-(\d{8}T\d{6})-[0-9a-f]{8}")


class NotPublished(StorageError):
    """A folder has no manifest: it was never published, or its job did not finish."""


def read_manifest(uri: str) -> dict[str, Any]:
    try:
        data = read_bytes(join(uri, MANIFEST))
    except FileNotFoundError:
        raise NotPublished(f"{uri} is not published (no {MANIFEST}); a reader trusts only published folders") from None
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{join(uri, MANIFEST)}: not valid JSON ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{join(uri, MANIFEST)}: unknown manifest format {manifest.get('format')!r}")
    return manifest


def is_published(uri: str) -> bool:
    return exists(join(uri, MANIFEST))


def data_uri(uri: str, manifest: dict[str, Any] | None = None) -> str:
    """The folder holding a publication's files."""
    manifest = manifest or read_manifest(uri)
    return join(uri, manifest["data_dir"])


def read_latest(uri: str) -> str | None:
    """The transaction folder that the pointer `<uri>/_LATEST` names; None where there is no pointer."""
    target = join(uri, LATEST)
    try:
        data = read_bytes(target)
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{target}: not valid JSON ({e})") from e
    if not isinstance(pointer, dict) or pointer.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{target}: not a publication pointer of format {MANIFEST_FORMAT!r}")
    if not TRANSACTION.fullmatch(str(pointer.get("data_dir"))):
        raise DataError(f"{target}: data_dir {pointer.get('data_dir')!r} is not a transaction folder")
    return pointer["data_dir"]


def latest_data_uri(uri: str) -> str:
    """The committed folder of a publication's latest version, resolved in one read of its pointer.

    That folder is complete before the pointer names it and never changes, so a reader that reads below
    it (pandas, DuckDB, Spark on `<folder>/<table>/`) sees one whole version, also on S3 while a new one is
    being published. A publication committed before pointers existed is resolved through its manifest.
    """
    data_dir = read_latest(uri)
    return join(uri, data_dir) if data_dir else data_uri(uri)


def table_files(uri: str, name: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """The Parquet files of one table of a publication, as URIs."""
    manifest = manifest or read_manifest(uri)
    if name not in manifest["tables"]:
        raise DataError(f"{uri}: publication has no table {name!r} (has {sorted(manifest['tables'])})")
    base = join(data_uri(uri, manifest), name)
    return [join(base, f) for f in manifest["tables"][name]["files"]]


def read_table(uri: str, name: str) -> pa.Table:
    """A whole table of a published folder, in shard order."""
    return read_parquet_files(table_files(uri, name))
