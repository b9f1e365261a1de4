"""The one module that knows object storage: URIs, Parquet shards, and the publish protocol.

A URI is a local path or `s3://bucket/prefix`. S3 endpoint, credentials and region
come from the standard AWS variables, so MinIO and other S3-compatible stores work.

Publish protocol (the commit protocol of Delta Lake / Iceberg, reduced to one object):
a publication writes all its files under `<uri>/data-<txn>/`, then creates
`<uri>/_MANIFEST.json` with a conditional write (S3 `IfNoneMatch="*"`, a hard link on
local disk). The manifest lists the transaction folder; readers trust only it. A job
that dies before the manifest leaves an unreferenced `data-*` folder, never a
half-published output, and two jobs racing to publish cannot both win.

After the commit, each table, file and folder of a publication also appears at a stable path
`<uri>/<name>` (`stable_names`), which peft, pandas, DuckDB and Spark read without the manifest.
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = "llmemb-dist/1"
# Seconds, so an unreachable endpoint fails fast instead of hanging on retries.
S3_CONNECT_TIMEOUT = 3
S3_REQUEST_TIMEOUT = 30
S3_MAX_ATTEMPTS = 2

log = logging.getLogger(__name__)


class StorageError(IOError):
    """Storage cannot be reached or read; the message names the URI."""


class NotPublished(StorageError):
    """A folder has no manifest: it was never published, or its job did not finish."""


class AlreadyPublished(StorageError):
    """Another job already published this folder; it is left intact."""


class DataError(ValueError):
    """Input data that breaks a contract; the message names the file, row or field."""


# ---------------------------------------------------------------- URIs


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


# ---------------------------------------------------------------- files


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file: {uri}")
        with fs.open_input_stream(path) as f:
            return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


COPY_THREADS = 16  # copies are requests to the store, not work of this process: many at once


def copy_files(pairs: list[tuple[str, str]]) -> None:
    """Copies files (source URI, target URI) without passing their bytes through this process: a hard link
    on a local disk (a plain copy across devices), a server-side copy on S3. Published files never change,
    so a link shares nothing that could be altered under a reader."""
    from concurrent.futures import ThreadPoolExecutor

    def copy(pair: tuple[str, str]) -> None:
        (fs, source), (_, target) = resolve(pair[0]), resolve(pair[1])
        with _storage_errors(pair[0]):
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if is_s3(pair[0]):
                fs.copy_file(source, target)
                return
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(copy, pairs))


def list_dirs(uri: str) -> list[str]:
    """Names of the sub-folders of a folder (empty if it does not exist)."""
    fs, path = resolve(uri)
    with _storage_errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def upload_dir(local_dir: str | Path, uri: str) -> list[str]:
    """Copies a local folder to a URI; returns the relative paths copied."""
    fs, path = resolve(uri)
    local_dir = Path(local_dir)
    rel_paths = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    with _storage_errors(uri):
        for rel in rel_paths:
            target = f"{path}/{rel}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local_dir / rel), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return rel_paths


def download(uri: str, local_dir: str | Path) -> Path:
    """Copies a file or folder from a URI into `local_dir`, keeping its name; returns the local path."""
    fs, path = resolve(uri)
    with _storage_errors(uri):
        kind = fs.get_file_info(path).type
    target = Path(local_dir) / path.rstrip("/").rsplit("/", 1)[-1]
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    if kind == pafs.FileType.Directory:
        return download_dir(uri, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(read_bytes(uri))
    return target


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copies a folder from a URI to a local folder (written beside, then renamed into place)."""
    fs, path = resolve(uri)
    local_dir = Path(local_dir)
    if local_dir.exists():
        return local_dir
    tmp = Path(tempfile.mkdtemp(dir=local_dir.parent if local_dir.parent.exists() else None, prefix=".dl-"))
    with _storage_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such folder: {uri}")
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(local_dir)
    except OSError:  # another process on this node finished first; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


# ---------------------------------------------------------------- Parquet


def write_shards(table: pa.Table, uri: str, num_shards: int) -> list[str]:
    """Writes `table` as up to `num_shards` contiguous Parquet shards; returns their file names."""
    return write_batches([table], table.num_rows, uri, num_shards, table.schema)


def write_batches(batches: Iterable[pa.RecordBatch | pa.Table], num_rows: int, uri: str, num_shards: int,
                  schema: pa.Schema | None = None) -> list[str]:
    """Writes a stream of `num_rows` rows (record batches or tables) as up to `num_shards` contiguous Parquet
    shards of equal size, one batch in memory at a time; returns the file names. No rows: one empty shard
    of `schema`."""
    fs, path = resolve(uri)
    num_shards = max(1, min(num_shards, num_rows))
    bounds = [num_rows * i // num_shards for i in range(num_shards + 1)]
    names = [f"part-{i:05d}.parquet" for i in range(num_shards)]
    shard, written, writer = 0, 0, None
    with _storage_errors(uri):
        fs.create_dir(path, recursive=True)
        if not num_rows:
            pq.write_table(schema.empty_table(), f"{path}/{names[0]}", filesystem=fs)
        try:
            for batch in batches:
                while batch.num_rows:
                    if shard == num_shards:
                        raise ValueError(f"{uri}: more rows than the {num_rows} announced")
                    writer = writer or pq.ParquetWriter(f"{path}/{names[shard]}", batch.schema, filesystem=fs)
                    part = batch.slice(0, bounds[shard + 1] - written)
                    writer.write(part)
                    written, batch = written + part.num_rows, batch.slice(part.num_rows)
                    if written == bounds[shard + 1]:
                        writer.close()
                        writer, shard = None, shard + 1
        finally:
            if writer is not None:
                writer.close()
    if written != num_rows:
        raise ValueError(f"{uri}: {written} rows written where {num_rows} were announced")
    return names


def read_parquet_files(uris: list[str], columns: list[str] | None = None) -> pa.Table:
    tables = []
    for uri in uris:
        fs, path = resolve(uri)
        try:
            tables.append(pq.read_table(path, columns=columns, filesystem=fs))
        except pa.ArrowInvalid as e:
            raise DataError(f"{uri}: not a readable Parquet file ({e})") from e
        except OSError as e:
            raise StorageError(f"cannot read {uri}: {e}") from e
    return pa.concat_tables(tables) if tables else pa.table({})


# ---------------------------------------------------------------- publications


def read_schema(uri: str) -> pa.Schema:
    """A Parquet file's schema, from its footer alone."""
    fs, path = resolve(uri)
    with _storage_errors(uri), fs.open_input_file(path) as f:
        return pq.read_schema(f)


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


def data_uri(uri: str, manifest: dict[str, Any] | None = None) -> str:
    """The folder holding a publication's files."""
    manifest = manifest or read_manifest(uri)
    return join(uri, manifest["data_dir"])


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
    """Writes a publication: files under a fresh transaction folder, then the manifest, last.

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


TRANSACTION = re.compile(r"data-(\d{8}T\d{6})-[0-9a-f]{8}")


def unreferenced_transactions(root: str, older_than: dt.timedelta) -> list[str]:
    """The transaction folders under `root` that no manifest names and that were begun more than
    `older_than` ago (their name says when): what a crashed job or the loser of a publish race left.
    A younger one may still be being written, so it is never listed."""
    fs, path = resolve(root)
    with _storage_errors(root):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    named: dict[str, str | None] = {}
    out = []
    for info in infos:
        begun = TRANSACTION.fullmatch(info.base_name)
        if info.type != pafs.FileType.Directory or not begun:
            continue
        uri = ("s3://" + info.path) if is_s3(root) else info.path
        publication = uri.rsplit("/", 1)[0]
        if publication not in named:
            named[publication] = read_manifest(publication)["data_dir"] if is_published(publication) else None
        started = dt.datetime.strptime(begun[1], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
        if named[publication] != info.base_name and started < cutoff:
            out.append(uri)
    return sorted(out)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _commit_manifest(uri: str, body: bytes, overwrite: bool) -> None:
    target = join(uri, MANIFEST)
    if is_s3(uri):
        from botocore.exceptions import ClientError, EndpointConnectionError

        bucket, key = _bucket_key(target)
        extra = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **extra)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise AlreadyPublished(f"{uri} was published by another job first; it is left intact") from e
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
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic exclusive create with the content already in place
    except FileExistsError:
        raise AlreadyPublished(f"{uri} was published by another job first; it is left intact") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
