"""Parquet at a URI: a table or a stream of batches written as contiguous shards, and read back."""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from llmemb_dist.storage.uris import DataError, StorageError, _storage_errors, resolve


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


def read_schema(uri: str) -> pa.Schema:
    """A Parquet file's schema, from its footer alone."""
    fs, path = resolve(uri)
    with _storage_errors(uri), fs.open_input_file(path) as f:
        return pq.read_schema(f)
