"""Per-block work of the embedding job that runs in Ray tasks: filters, idempotent writes, checksums."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH


def key_checksum(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> int:
    """A multiset fingerprint of (item_id, text_hash) rows: the sum of 64-bit row hashes, mod 2^64.

    Sums compose across blocks, so the driver compares the output against the catalog without
    reading the output back: a missing, duplicated or altered row changes the sum (odds 2^-64).
    """
    keys = item_ids.to_pandas().astype(object) + "\x1f" + hashes.to_pandas().astype(object)
    return int(pd.util.hash_array(keys.to_numpy()).sum(dtype=np.uint64))


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
