"""The publish protocol (the commit protocol of Delta Lake / Iceberg, reduced to one object).

A publication writes all its files under `<uri>/data-<txn>/`, then creates `<uri>/_MANIFEST.json`
with a conditional write (S3 `IfNoneMatch="*"`, a hard link on local disk). The manifest lists the
transaction folder; readers trust only it. A job that dies before the manifest leaves an
unreferenced `data-*` folder, never a half-published output, and two jobs racing to publish cannot
both win.

Right after the commit, one write replaces the pointer `<uri>/_LATEST` ({"format", "data_dir"}): the
committed transaction folder in one small object, for readers that know no manifest. Then each table,
file and folder of the publication also appears at a stable path `<uri>/<name>` (`stable_names`), which
peft, pandas, DuckDB and Spark read without the manifest, and the folder of the version it replaced is
deleted.

Which path to read while a new version may be being published:
- `latest_data_uri(uri)` (the pointer) or the manifest (`read_table`, `table_files`, `data_uri`), then
  the files below the folder it names: safe on S3 and on a local disk. That folder is complete before
  either names it and never changes, so a reader sees one whole version. A reader still reading the
  replaced version's folder when it is deleted finds files missing (it resolves again); the pointer may
  lag the manifest (a job that died between the two writes), never name an uncommitted folder.
- the stable path `<uri>/<name>`: safe on a local disk (a symbolic link swapped by one rename). On S3 it is
  a copy made after the commit: while a version is copied over another, a reader there can see part of
  each. Read it on S3 only when no publication of `<uri>` is running.
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from llmemb_dist.storage.files import delete_tree, upload_dir, write_bytes
from llmemb_dist.storage.manifest import (LATEST, MANIFEST, MANIFEST_FORMAT, TRANSACTION, is_published,
                                          read_latest, read_manifest)
from llmemb_dist.storage.parquet import write_batches, write_shards
from llmemb_dist.storage.uris import StorageError, _bucket_key, _storage_errors, is_s3, join, resolve, s3_client

log = logging.getLogger(__name__)


class AlreadyPublished(StorageError):
    """Another job already published this folder; it is left intact."""


def already_published(uri: str, identity: dict[str, Any], what: str, *, hint: str = "",
                      differs: str = "another config or other inputs", replace: bool = False) -> bool:
    """The publish-or-skip guard every stage runs before any work.

    True when `uri` is published and its manifest has exactly the `identity` fields (a config
    hash, the inputs): the work is done. False when it is not published, or when it differs and
    `replace` allows publishing over it. Otherwise it refuses with AlreadyPublished: a published
    output is never silently replaced by a different one.
    """
    if not is_published(uri):
        return False
    manifest = read_manifest(uri)
    if all(manifest.get(key) == value for key, value in identity.items()):
        log.info("%s %s is already published from this config and these inputs: nothing to do", what, uri)
        return True
    if replace:
        return False
    raise AlreadyPublished(f"{uri} is published from {differs}" + (f"; {hint}" if hint else ""))


def code_version() -> str:
    from llmemb_dist import __version__

    return __version__


@dataclass
class Publication:
    """Files being written for one publication; see `publish`."""

    uri: str
    data_dir: str
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def data_uri(self) -> str:
        return join(self.uri, self.data_dir)

    def write_table(self, name: str, table: pa.Table, num_shards: int = 1) -> None:
        names = write_shards(table, join(self.data_uri, name), num_shards)
        self.tables[name] = {"files": names, "rows": table.num_rows, "schema": table.schema.to_string()}

    def write_batches(self, name: str, batches: Iterable[pa.RecordBatch | pa.Table], num_rows: int, num_shards: int = 1) -> None:
        """`write_table` for a table that does not fit in memory: the first batch gives the schema."""
        batches = iter(batches)
        first = next(batches)
        names = write_batches(itertools.chain([first], batches), num_rows, join(self.data_uri, name), num_shards)
        self.tables[name] = {"files": names, "rows": num_rows, "schema": first.schema.to_string()}

    def add_table_files(self, name: str, files: list[str], rows: int, schema: pa.Schema) -> None:
        """Registers Parquet files written into `<data_uri>/<name>/` by other processes (e.g. Ray Data)."""
        self.tables[name] = {"files": sorted(files), "rows": rows, "schema": schema.to_string()}

    def write_text(self, rel_path: str, text: str) -> None:
        write_bytes(join(self.data_uri, rel_path), text.encode())
        self.files.append(rel_path)

    def upload_dir(self, local_dir: str | Path, rel_path: str) -> None:
        self.files += [f"{rel_path}/{p}" for p in upload_dir(local_dir, join(self.data_uri, rel_path))]


@contextmanager
def publish(
    uri: str,
    kind: str,
    config: dict[str, Any],
    config_hash: str,
    inputs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[Publication]:
    """Writes a publication: files under a fresh transaction folder, then the manifest (the commit), then
    the pointer and the stable paths.

    Without `overwrite`, a folder that is already published is refused before any work.
    If the body raises, nothing is published and an earlier version stays as it was.
    """
    if not overwrite and is_published(uri):
        raise AlreadyPublished(f"{uri} is already published; choose another name or pass overwrite")
    txn = f"data-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    pub = Publication(uri=uri, data_dir=txn)
    previous_manifest = read_manifest(uri) if overwrite and is_published(uri) else None
    previous = previous_manifest and previous_manifest["data_dir"]
    pub.write_text("config.yaml", _yaml(config))
    yield pub
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "data_dir": txn,
        "tables": pub.tables,
        "files": pub.files,
        "config": config,
        "config_hash": config_hash,
        "inputs": inputs or {},
        "code_version": code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        **pub.info,
    }
    _commit_manifest(uri, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode(), overwrite)
    # Before the stable copies, so that a reader through the pointer never reads a folder being copied.
    _write_whole(join(uri, LATEST), json.dumps({"format": MANIFEST_FORMAT, "data_dir": txn}).encode(), exclusive=False)
    _expose(uri, manifest, previous_manifest)
    if previous and previous != txn:
        delete_tree(join(uri, previous))


def stable_names(manifest: dict[str, Any]) -> list[str]:
    """What a publication shows at `<uri>/<name>`: its tables, and its top-level files and folders."""
    return sorted(set(manifest["tables"]) | {f.split("/", 1)[0] for f in manifest["files"]})


def _stable_files(manifest: dict[str, Any]) -> set[str]:
    """Every file of a publication, relative to its transaction folder."""
    tables = {f"{name}/{f}" for name, table in manifest["tables"].items() for f in table["files"]}
    return tables | set(manifest["files"])


def _expose(uri: str, manifest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Once committed, the publication at its stable paths. On a local disk each name is a relative
    symbolic link, swapped in by one rename: a reader sees the old version or the new one, never a mix.
    S3 has no links: each object is copied server-side, and every folder gets `_SUCCESS` last (the
    Hadoop/Spark convention; readers skip `_` files), removed first when a version is replaced."""
    names = stable_names(manifest)
    fs, base = resolve(uri)
    with _storage_errors(uri):
        if not is_s3(uri):
            for name in names:
                staged = os.path.join(base, f".{name}.{uuid.uuid4().hex[:8]}.link")
                os.symlink(f"{manifest['data_dir']}/{name}", staged)
                os.replace(staged, os.path.join(base, name))
            for entry in os.scandir(base):  # a name only the replaced version had
                if entry.is_symlink() and entry.name not in names and TRANSACTION.fullmatch(os.readlink(entry.path).split("/")[0]):
                    os.unlink(entry.path)
            return
        files = _stable_files(manifest)
        folders = sorted({f.split("/", 1)[0] for f in files if "/" in f})
        for folder in folders:
            if fs.get_file_info(f"{base}/{folder}/_SUCCESS").type != pafs.FileType.NotFound:
                fs.delete_file(f"{base}/{folder}/_SUCCESS")
        for rel in sorted(files):
            fs.copy_file(f"{base}/{manifest['data_dir']}/{rel}", f"{base}/{rel}")
        for rel in sorted(_stable_files(previous) - files if previous else ()):
            fs.delete_file(f"{base}/{rel}")
        for folder in folders:
            with fs.open_output_stream(f"{base}/{folder}/_SUCCESS"):
                pass


def unreferenced_transactions(root: str, older_than: dt.timedelta) -> list[str]:
    """The transaction folders under `root` that neither a manifest nor a pointer names and that were
    begun more than `older_than` ago (their name says when): what a crashed job or the loser of a publish
    race left. A younger one may still be being written, so it is never listed."""
    fs, path = resolve(root)
    with _storage_errors(root):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    named: dict[str, set[str | None]] = {}
    out = []
    for info in infos:
        begun = TRANSACTION.fullmatch(info.base_name)
        if info.type != pafs.FileType.Directory or not begun:
            continue
        uri = ("s3://" + info.path) if is_s3(root) else info.path
        publication = uri.rsplit("/", 1)[0]
        if publication not in named:
            committed = read_manifest(publication)["data_dir"] if is_published(publication) else None
            named[publication] = {committed, read_latest(publication)}
        started = dt.datetime.strptime(begun[1], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
        if info.base_name not in named[publication] and started < cutoff:
            out.append(uri)
    return sorted(out)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _commit_manifest(uri: str, body: bytes, overwrite: bool) -> None:
    try:
        _write_whole(join(uri, MANIFEST), body, exclusive=not overwrite)
    except FileExistsError:
        raise AlreadyPublished(f"{uri} was published by another job first; it is left intact") from None


def _write_whole(target: str, body: bytes, exclusive: bool) -> None:
    """Writes a small JSON object so that a reader finds the old one or the new one, never part of one:
    one PUT on S3 (through boto3, which has the conditional write pyarrow lacks), a complete file renamed
    or hard-linked into place on a local disk. `exclusive`: FileExistsError where `target` exists."""
    if is_s3(target):
        from botocore.exceptions import ClientError, EndpointConnectionError

        bucket, key = _bucket_key(target)
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **extra)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise FileExistsError(target) from e
            raise StorageError(f"cannot write {target}: {e}") from e
        except EndpointConnectionError as e:
            raise StorageError(f"cannot write {target}: {e}") from e
        return
    _, path = resolve(target)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            os.link(tmp, path)  # atomic exclusive create with the content already in place
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
