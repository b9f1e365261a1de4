"""Block-wise Parquet I/O with Ray Data for the stages that stream whole tables (embed, adapt): reads,
id filters, what an incremental run carries over, idempotent content-named writes and the exactly-once check.

Vectors are read and written by Ray workers; the driver sees the (item_id, text_hash) keys, file names,
row counts and checksums.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH
from llmemb_dist.progress import Progress

log = logging.getLogger(__name__)
CHECKSUM_ROWS = 65_536


def read(uris: list[str], columns: list[str] | None = None, min_blocks: int = 0, include_paths: bool = False):
    import ray

    fs, _ = storage.resolve(uris[0])
    blocks = {"override_num_blocks": max(len(uris), min_blocks)} if min_blocks else {}
    return ray.data.read_parquet([storage.resolve(u)[1] for u in uris], filesystem=fs, columns=columns,
                                 include_paths=include_paths, **blocks)


def read_keys(files: list[str], with_file: bool = False) -> pa.Table:
    """The (item_id, text_hash) columns only, read by Ray workers and gathered on the driver; `with_file`
    adds `file`, the index in `files` of the file each row is in (found by the workers: a path per row
    would cost the driver more than the keys)."""
    import ray

    keys = read(files, columns=[ITEM_ID, TEXT_HASH], include_paths=with_file)
    if with_file:
        keys = keys.map_batches(_file_index, fn_kwargs={"paths": [storage.resolve(f)[1] for f in files]},
                                batch_format="pyarrow")
    columns = [ITEM_ID, TEXT_HASH, *(["file"] if with_file else [])]
    return pa.concat_tables([t.select(columns) for t in ray.get(keys.to_arrow_refs())]).combine_chunks()


def _file_index(batch: pa.Table, paths: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.drop(["path"]).append_column("file", pc.index_in(batch["path"], value_set=pa.array(paths)))


def _joined(t: pa.Table) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(t[ITEM_ID], t[TEXT_HASH], "\x1f")


@dataclass
class CarryOver:
    """What an incremental run takes from the previous version of its table. A previous file every row
    of which is still current is copied as it is, by the storage (a hard link on a local disk, a
    server-side copy on S3): no worker reads or rewrites it. From the other previous files the current
    rows are read and rewritten. So a day that adds items to a catalog costs what the new items cost."""

    reused_ids: pa.Array  # every item whose row is carried over
    removed: int  # previous items no longer in the catalog
    whole: list[dict] = field(default_factory=list)  # {"uri", "file", "rows", "checksum"} of files copied as they are
    partial: list[str] = field(default_factory=list)  # URIs of files whose current rows are rewritten

    @property
    def reused(self) -> int:
        return len(self.reused_ids)

    def file_counts(self) -> dict[str, int]:
        """What the manifest records of it: previous files copied as they are, and rewritten in part."""
        return {"copied": len(self.whole), "rewritten": len(self.partial)}


def carry_over(keys: pa.Table, previous_files: list[str]) -> CarryOver:
    """Which rows of the previous version's files (`previous_files`) the catalog's `keys` still hold as
    they are: an item whose (item_id, text_hash) row is in both is carried over."""
    import pyarrow.compute as pc

    previous = read_keys(previous_files, with_file=True)
    same = pc.is_in(_joined(previous), value_set=_joined(keys))
    removed = int(pc.sum(pc.invert(pc.is_in(previous[ITEM_ID], value_set=keys[ITEM_ID]))).as_py() or 0)
    carry = CarryOver(previous[ITEM_ID].filter(same).combine_chunks(), removed)
    counts = pa.table({"file": previous["file"], "same": same}).group_by("file").aggregate(
        [("same", "sum"), ("same", "count")]).sort_by("file")
    checksums = file_checksums(previous, len(previous_files))
    for k, current, rows in zip(*(counts[c].to_pylist() for c in ("file", "same_sum", "same_count"))):
        uri = previous_files[k]
        if current == rows:
            carry.whole.append({"uri": uri, "file": uri.rsplit("/", 1)[-1], "rows": rows, "checksum": int(checksums[k])})
        elif current:
            carry.partial.append(uri)
    return carry


def _row_hashes(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    keys = item_ids.to_pandas().astype(object) + "\x1f" + hashes.to_pandas().astype(object)
    return pd.util.hash_array(keys.to_numpy())


def key_checksum(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> int:
    """A multiset fingerprint of (item_id, text_hash) rows: the sum of 64-bit row hashes, mod 2^64.

    Sums compose across blocks, so the driver compares the output against the catalog without
    reading the output back: a missing, duplicated or altered row changes the sum (odds 2^-64).
    """
    total = 0
    # In slices: the driver checks a whole catalog's keys this way, and Python strings of every row at
    # once would cost it several times what the keys themselves take.
    for start in range(0, len(item_ids), CHECKSUM_ROWS):
        hashed = _row_hashes(item_ids[start: start + CHECKSUM_ROWS], hashes[start: start + CHECKSUM_ROWS])
        total = (total + int(hashed.sum(dtype=np.uint64))) % 2**64
    return total


def file_checksums(keys: pa.Table, num_files: int) -> np.ndarray:
    """`key_checksum` of each file's rows, from keys with a `file` column (uint64 sums wrap mod 2^64)."""
    sums = np.zeros(num_files, dtype=np.uint64)
    for start in range(0, keys.num_rows, CHECKSUM_ROWS):
        part = keys.slice(start, CHECKSUM_ROWS)
        np.add.at(sums, part["file"].to_numpy(), _row_hashes(part[ITEM_ID], part[TEXT_HASH]))
    return sums


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


def write(dataset, folder: str, rows_per_file: int, progress: Progress | None = None, done: int = 0) -> list[dict]:
    """Writes the dataset as content-named Parquet files; returns one record per distinct file. `progress`
    hears of the rows written so far (after `done` rows already there) as each file is."""
    written = dataset.map_batches(write_block, fn_kwargs={"folder_uri": folder}, batch_size=rows_per_file, batch_format="pyarrow")
    files: dict[str, dict] = {}
    rows = done
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for record in batch.to_pylist():
            # A block written twice (its task retried) wrote the same file twice: count it once.
            rows += 0 if record["file"] in files else record["rows"]
            files[record["file"]] = record
        if progress:
            progress.update(rows)
    return list(files.values())


def write_with_carry_over(parts: list, carry: CarryOver | None, folder: str, rows_per_file: int,
                          progress: Progress | None = None) -> list[dict]:
    """Writes the computed `parts` (Ray Datasets) and what `carry` takes from the previous version: its
    whole files copied as they are, the current rows of its other files rewritten; returns every file's record."""
    import ray

    copied = []
    if carry is not None:
        storage.copy_files([(c["uri"], storage.join(folder, c["file"])) for c in carry.whole])
        copied = [{k: c[k] for k in ("file", "rows", "checksum")} for c in carry.whole]
        if carry.partial:
            parts = parts + [read(carry.partial).map_batches(
                keep_rows, fn_kwargs={"ids_ref": ray.put(carry.reused_ids), "keep": True}, batch_format="pyarrow")]
    done = sum(c["rows"] for c in copied)
    if copied:
        log.info("copied %d files (%d rows) of the previous version as they are", len(copied), done)
    if progress:
        progress.start = done  # the pace, and so the ETA, is the written rows'
    if not parts:
        return copied
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return copied + write(dataset, folder, rows_per_file, progress, done)


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
