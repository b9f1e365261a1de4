"""Block-wise Parquet I/O with Ray Data for the stages that stream whole tables (embed, adapt): reads,
id filters, idempotent content-named writes and the exactly-once check.

Blocks are read and written by Ray workers; the driver sees only file names, row counts and checksums.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH
from llmemb_dist.progress import Progress

CHECKSUM_ROWS = 65_536


def read(uris: list[str], columns: list[str] | None = None, min_blocks: int = 0):
    import ray

    fs, _ = storage.resolve(uris[0])
    blocks = {"override_num_blocks": max(len(uris), min_blocks)} if min_blocks else {}
    return ray.data.read_parquet([storage.resolve(u)[1] for u in uris], filesystem=fs, columns=columns, **blocks)


def read_keys(files: list[str]) -> pa.Table:
    """The (item_id, text_hash) columns only; read by Ray workers, gathered on the driver."""
    import ray

    tables = ray.get(read(files, columns=[ITEM_ID, TEXT_HASH]).to_arrow_refs())
    return pa.concat_tables([t.select([ITEM_ID, TEXT_HASH]) for t in tables]).combine_chunks()


def unchanged_since(keys: pa.Table, previous_keys: pa.Table) -> tuple[pa.Array, int]:
    """The item ids whose (item_id, text_hash) row is in both key tables, and how many previous ids are gone."""
    import pyarrow.compute as pc

    def joined(t: pa.Table) -> pa.ChunkedArray:
        return pc.binary_join_element_wise(t[ITEM_ID], t[TEXT_HASH], "\x1f")

    same = pc.is_in(joined(keys), value_set=joined(previous_keys))
    removed = int(pc.sum(pc.invert(pc.is_in(previous_keys[ITEM_ID], value_set=keys[ITEM_ID]))).as_py() or 0)
    return keys[ITEM_ID].filter(same).combine_chunks(), removed


def key_checksum(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> int:
    """A multiset fingerprint of (item_id, text_hash) rows: the sum of 64-bit row hashes, mod 2^64.

    Sums compose across blocks, so the driver compares the output against the catalog without
    reading the output back: a missing, duplicated or altered row changes the sum (odds 2^-64).
    """
    total = 0
    # In slices: the driver checks a whole catalog's keys this way, and Python strings of every row at
    # once would cost it several times what the keys themselves take.
    for start in range(0, len(item_ids), CHECKSUM_ROWS):
        ids, part = item_ids[start: start + CHECKSUM_ROWS], hashes[start: start + CHECKSUM_ROWS]
        keys = ids.to_pandas().astype(object) + "\x1f" + part.to_pandas().astype(object)
        total = (total + int(pd.util.hash_array(keys.to_numpy()).sum(dtype=np.uint64))) % 2**64
    return total


def keep_rows(batch: pa.Table, ids_ref, keep: bool) -> pa.Table:
    """Rows whose item_id is (keep=True) or is not (keep=False) in the shared id array."""
    import pyarrow.compute as pc
    import ray

    mask = pc.is_in(batch[ITEM_ID], value_set=ray.get(ids_ref))
    return batch.filter(mask if keep else pc.invert(mask))


def write_block(batch: pa.Table, folder_uri: str) -> pa.Table:
    """Writes one batch as one Parquet file named by its item ids; returns (file, rows, checksum).

    The name depends only on the content, so a retried task (an actor that died, a lost
    worker) rewrites the same file instead of adding a second copy.
    """
    if batch.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64()), "checksum": pa.array([], pa.uint64())})
    ids = batch[ITEM_ID].to_pylist()
    name = f"part-{hashlib.sha256(chr(10).join(sorted(ids)).encode()).hexdigest()[:24]}.parquet"
    buf = io.BytesIO()
    pq.write_table(batch, buf)
    storage.write_bytes(storage.join(folder_uri, name), buf.getvalue())
    checksum = key_checksum(batch[ITEM_ID], batch[TEXT_HASH])
    return pa.table({"file": [name], "rows": pa.array([batch.num_rows], pa.int64()), "checksum": pa.array([checksum], pa.uint64())})


def write(dataset, folder: str, rows_per_file: int, progress: Progress | None = None) -> list[dict]:
    """Writes the dataset as content-named Parquet files; returns one record per distinct file. `progress`
    hears of the rows written so far as each file is."""
    written = dataset.map_batches(write_block, fn_kwargs={"folder_uri": folder}, batch_size=rows_per_file, batch_format="pyarrow")
    files: dict[str, dict] = {}
    rows = 0
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for record in batch.to_pylist():
            # A block written twice (its task retried) wrote the same file twice: count it once.
            rows += 0 if record["file"] in files else record["rows"]
            files[record["file"]] = record
        if progress:
            progress.update(rows)
    return list(files.values())


def uris(folder: str, meta: list[dict]) -> list[str]:
    return [storage.join(folder, m["file"]) for m in meta]


def verify(meta: list[dict], keys: pa.Table, out_uri: str, what: str) -> int:
    """Exactly once: the written rows must be the (item_id, text_hash) rows of `keys`, each once."""
    rows = sum(m["rows"] for m in meta)
    checksum = sum(int(m["checksum"]) for m in meta) % 2**64
    expected = key_checksum(keys[ITEM_ID], keys[TEXT_HASH])
    if rows != keys.num_rows or checksum != expected:
        raise storage.StorageError(
            f"{out_uri}: the written {what} are not the input's items exactly once ({rows} rows written, "
            f"{keys.num_rows} expected; (item_id, text_hash) checksum {'matches' if checksum == expected else 'differs'}); "
            "nothing is published"
        )
    return rows
