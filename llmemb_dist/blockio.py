"""Block-wise Parquet I/O with Ray Data for the stages that stream whole tables (embed, adapt): reads,
id filters, what an incremental run carries over, idempotent content-named writes and the exactly-once check.

Vectors and keys are read and written by Ray workers; the driver sees file names, row counts and checksums.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH
from llmemb_dist.progress import Progress

log = logging.getLogger(__name__)
HASH_ROWS = 65_536


def read(uris: list[str], columns: list[str] | None = None, min_blocks: int = 0, include_paths: bool = False):
    import ray

    fs, _ = storage.resolve(uris[0])
    blocks = {"override_num_blocks": max(len(uris), min_blocks)} if min_blocks else {}
    return ray.data.read_parquet([storage.resolve(u)[1] for u in uris], filesystem=fs, columns=columns,
                                 include_paths=include_paths, **blocks)


@dataclass
class Keys:
    """A table's (item_id, text_hash) rows as Ray holds them: the driver has the count and the checksum;
    with lookups, the sorted 64-bit hashes of the rows and of the item ids stay in the object store for
    the tasks that look rows up. So the driver's memory does not grow with the catalog."""

    rows: int
    checksum: int
    row_hashes: object | None  # ObjectRef of a sorted uint64 array (with lookups)
    item_hashes: object | None  # ObjectRef of a sorted uint64 array (with lookups)
    blank: str | None = None  # the first item found whose text_hash is `blank_hash`, if one was given


def table_keys(files: list[str], blank_hash: str | None = None, lookups: bool = False) -> Keys:
    """The Keys of the rows of `files`, one Ray task per file; `lookups` (an incremental run's carry-over)
    adds the sorted hashes, which a full run does not need."""
    import ray

    per_file = [ray.remote(num_returns=3)(_file_keys).remote(f, blank_hash, lookups) for f in files]
    summaries = ray.get([refs[0] for refs in per_file])
    merge = ray.remote(_sorted_union)
    return Keys(
        rows=sum(s["rows"] for s in summaries),
        checksum=sum(s["checksum"] for s in summaries) % 2**64,
        row_hashes=merge.remote(*[refs[1] for refs in per_file]) if lookups else None,
        item_hashes=merge.remote(*[refs[2] for refs in per_file]) if lookups else None,
        blank=next((s["blank"] for s in summaries if s["blank"]), None),
    )


def _file_keys(uri: str, blank_hash: str | None, lookups: bool) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    keys, rows = _read_keys(uri)
    blank = None
    if blank_hash:
        hits = keys[ITEM_ID].filter(pc.equal(keys[TEXT_HASH], blank_hash))
        blank = hits[0].as_py() if len(hits) else None
    summary = {"rows": keys.num_rows, "checksum": int(rows.sum(dtype=np.uint64)), "blank": blank}
    if not lookups:
        return summary, None, None
    return summary, rows, _hashes(keys[ITEM_ID])  # sorted once, in their union


def _read_keys(uri: str) -> tuple[pa.Table, np.ndarray]:
    """One file's (item_id, text_hash) columns and their row hashes."""
    keys = storage.read_parquet_files([uri], columns=[ITEM_ID, TEXT_HASH])
    return keys, row_hashes(keys[ITEM_ID], keys[TEXT_HASH])


def _sorted_union(*arrays: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate(arrays)) if arrays else np.empty(0, dtype=np.uint64)


def _members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Per value, whether it is in `sorted_set`."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


@dataclass
class CarryOver:
    """What an incremental run takes from the previous version of its table. A previous file every row
    of which is still current is copied as it is, by the storage (a hard link on a local disk, a
    server-side copy on S3): no worker reads or rewrites it. A file only some of whose rows are current is
    rewritten with those rows by one Ray task, from the keep mask the planning task made of it: no row is
    hashed twice. So a day that adds items to a catalog costs what the new items cost."""

    reused: int  # rows carried over: their (item_id, text_hash) is in both versions
    removed: int  # previous items no longer in the catalog
    previous_rows: object  # ObjectRef of the previous version's sorted row hashes: a catalog row in it is not recomputed
    whole: list[dict] = field(default_factory=list)  # {"uri", "file", "rows", "checksum"} of files copied as they are
    partial: list[dict] = field(default_factory=list)  # {"uri", "keep" (ObjectRef of a row mask), "rows", "checksum"} of files rewritten

    def file_counts(self) -> dict[str, int]:
        """What the manifest records of it: previous files copied as they are, and rewritten in part."""
        return {"copied": len(self.whole), "rewritten": len(self.partial)}


def carry_over(keys: Keys, previous_files: list[str]) -> CarryOver:
    """Which rows of the previous version's files (`previous_files`) the catalog's `keys` (with lookups)
    still hold as they are (an item whose (item_id, text_hash) row is in both is carried over), one Ray
    task per file."""
    import ray

    per_file = [ray.remote(num_returns=3)(_file_carry).remote(f, keys.row_hashes, keys.item_hashes)
                for f in previous_files]
    counts = ray.get([refs[0] for refs in per_file])
    carry = CarryOver(sum(c["same"] for c in counts), sum(c["removed"] for c in counts),
                      ray.remote(_sorted_union).remote(*[refs[1] for refs in per_file]))
    for uri, c, refs in zip(previous_files, counts, per_file):
        if c["same"] == c["rows"]:
            carry.whole.append({"uri": uri, "file": uri.rsplit("/", 1)[-1], "rows": c["rows"], "checksum": c["checksum"]})
        elif c["same"]:
            carry.partial.append({"uri": uri, "keep": refs[2], "rows": c["same"], "checksum": c["same_checksum"]})
    return carry


def _file_carry(uri: str, current_rows: np.ndarray, current_items: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    keys, rows = _read_keys(uri)
    same = _members(rows, current_rows)
    counts = {"rows": keys.num_rows, "same": int(same.sum()),
              "removed": int((~_members(_hashes(keys[ITEM_ID]), current_items)).sum()),
              "checksum": int(rows.sum(dtype=np.uint64)), "same_checksum": int(rows[same].sum(dtype=np.uint64))}
    return counts, rows, same


def _hashes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string, in slices: a Python string per row of a whole file at once would cost
    the worker several times what the file's keys take."""
    parts = [pd.util.hash_array(values.slice(start, HASH_ROWS).to_pandas().astype(object).to_numpy())
             for start in range(0, len(values), HASH_ROWS)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def row_hashes(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each (item_id, text_hash) row."""
    return _hashes(pc.binary_join_element_wise(item_ids, hashes, "\x1f"))


def key_checksum(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> int:
    """A multiset fingerprint of (item_id, text_hash) rows: the sum of 64-bit row hashes, mod 2^64.

    Sums compose across blocks, so the driver compares the output against the catalog without
    reading the output back: a missing, duplicated or altered row changes the sum (odds 2^-64).
    """
    return int(row_hashes(item_ids, hashes).sum(dtype=np.uint64))


def read_not_carried(uris: list[str], carry: CarryOver):
    """The rows of the Parquet files `uris` that `carry` does not take from the previous version (the ones to
    compute), as a Ray Dataset of a block per file. Ray Data's reader would put an incremental run's few rows
    in one or two read tasks, each also re-reading whole files for a handful of rows."""
    import ray

    return ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris)).map_batches(
        _not_carried_rows, fn_kwargs={"hashes_ref": carry.previous_rows}, batch_size=1, batch_format="pyarrow")


def _not_carried_rows(batch: pa.Table, hashes_ref) -> pa.Table:
    """The rows of the file named in `batch` whose (item_id, text_hash) is not in the shared sorted row hashes."""
    import ray

    table = storage.read_parquet_files(batch["uri"].to_pylist())
    return table.filter(~_members(row_hashes(table[ITEM_ID], table[TEXT_HASH]), ray.get(hashes_ref)))


def write_block(batch: pa.Table, folder_uri: str) -> pa.Table:
    """Writes one batch as one Parquet file named by its item ids; returns (file, rows, checksum)."""
    if batch.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64()), "checksum": pa.array([], pa.uint64())})
    record = _write_named(batch, folder_uri, key_checksum(batch[ITEM_ID], batch[TEXT_HASH]))
    return pa.table({"file": [record["file"]], "rows": pa.array([record["rows"]], pa.int64()),
                     "checksum": pa.array([record["checksum"]], pa.uint64())})


def _write_named(batch: pa.Table, folder_uri: str, checksum: int) -> dict:
    """Writes `batch` as one Parquet file whose name depends only on its item ids, so a retried task (an
    actor that died, a lost worker) rewrites the same file instead of adding a second copy."""
    ids = batch[ITEM_ID].to_pylist()
    name = f"part-{hashlib.sha256(chr(10).join(sorted(ids)).encode()).hexdigest()[:24]}.parquet"
    buf = io.BytesIO()
    pq.write_table(batch, buf)
    storage.write_bytes(storage.join(folder_uri, name), buf.getvalue())
    return {"file": name, "rows": batch.num_rows, "checksum": checksum}


def _rewrite_kept(uri: str, keep: np.ndarray, checksum: int, folder_uri: str) -> dict:
    """A previous file's current rows (`keep`, whose key checksum is `checksum`), written as a file of the new version."""
    return _write_named(storage.read_parquet_files([uri]).filter(keep), folder_uri, checksum)


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


def write_with_carry_over(computed, carry: CarryOver | None, folder: str, rows_per_file: int,
                          progress: Progress | None = None) -> list[dict]:
    """Writes the `computed` rows (a Ray Dataset, or None when there are none) and what `carry` takes from
    the previous version: its whole files copied as they are, the current rows of its other files rewritten
    by tasks that run beside the computed rows' pipeline; returns every file's record."""
    import ray

    copied, rewrites, done = [], [], 0
    if carry is not None:
        rewrite = ray.remote(_rewrite_kept)
        rewrites = [rewrite.remote(p["uri"], p["keep"], p["checksum"], folder) for p in carry.partial]
        storage.copy_files([(c["uri"], storage.join(folder, c["file"])) for c in carry.whole])
        copied = [{k: c[k] for k in ("file", "rows", "checksum")} for c in carry.whole]
        # Carried rows count as done from the start: the pace, and so the ETA, is the computed rows'.
        done = sum(c["rows"] for c in copied) + sum(p["rows"] for p in carry.partial)
    if copied:
        log.info("copied %d files (%d rows) of the previous version as they are", len(copied), sum(c["rows"] for c in copied))
    if progress:
        progress.start = done
    written = [] if computed is None else write(computed, folder, rows_per_file, progress, done)
    rewritten = ray.get(rewrites)
    if rewritten:
        log.info("rewrote the current rows of %d files of the previous version (%d rows)",
                 len(rewritten), sum(r["rows"] for r in rewritten))
    return copied + written + rewritten


def uris(folder: str, meta: list[dict]) -> list[str]:
    return [storage.join(folder, m["file"]) for m in meta]


def verify(meta: list[dict], keys: Keys, out_uri: str, what: str) -> int:
    """Exactly once: the written rows must be the (item_id, text_hash) rows of `keys`, each once."""
    rows = sum(m["rows"] for m in meta)
    checksum = sum(int(m["checksum"]) for m in meta) % 2**64
    if rows != keys.rows or checksum != keys.checksum:
        raise storage.StorageError(
            f"{out_uri}: the written {what} are not the input's items exactly once ({rows} rows written, "
            f"{keys.rows} expected; (item_id, text_hash) checksum {'matches' if checksum == keys.checksum else 'differs'}); "
            "nothing is published"
        )
    return rows
