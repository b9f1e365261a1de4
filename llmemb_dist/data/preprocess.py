"""The paper's preprocessing, streamed: item slicing, iterative k-core, sequence-length limits, value truncation.

Memory stays bounded as the dataset grows: the driver keeps the catalog's item ids, the sorted distinct
user ids and a counter per item, and holds one batch or one bucket of interactions at a time. The
interactions go through spill files on local disk as integers (user rank, catalog row, seconds), one
bucket per range of users: a bucket holds whole users, and the buckets in order hold the users in sorted
order, so sorting each bucket by (user, timestamp) sorts them all.

Deterministic: interactions are sorted stably by (user, timestamp), so ties keep input order and the same
input always gives the same rows in the same order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist.config import DatasetConfig
from llmemb_dist.data.catalog import ITEM_ID, TIMESTAMP, USER_ID, attribute_columns, refuse_undescribed_items, \
    validate_catalog_ids, with_text_hash
from llmemb_dist.data.importers import RawDataset, RawTable
from llmemb_dist.data.timestamps import TimestampScan, to_seconds
from llmemb_dist.storage import DataError

log = logging.getLogger(__name__)

ROWS_PER_BUCKET = 1_000_000  # interactions per spill bucket: what is in memory at once while filtering
SPILL = pa.schema([("user", pa.int32()), ("item", pa.int32()), (TIMESTAMP, pa.int64())])


@dataclass
class Prepared:
    """The preprocessed dataset, ready to be written as the catalog and interactions tables."""

    raw: RawDataset
    cfg: DatasetConfig
    source: str
    item_ids: pa.Array  # the raw catalog's, in file order
    kept: np.ndarray  # per raw catalog row: whether it stays in the catalog
    users: pa.Array  # distinct user ids, sorted: a user's rank indexes it
    buckets: list[Path]  # the interactions, sorted and filtered, as spill files
    num_users: int
    num_interactions: int

    @property
    def counts(self) -> dict[str, int]:
        return {"users": self.num_users, "items": int(self.kept.sum()), "interactions": self.num_interactions}

    def interactions(self) -> Iterator[pa.Table]:
        for path in self.buckets:
            spill = _read(path)
            yield pa.table({USER_ID: self.users.take(spill["user"]), ITEM_ID: self.item_ids.take(spill["item"]),
                                   TIMESTAMP: spill[TIMESTAMP]})

    def catalog(self) -> Iterator[pa.Table]:
        """The kept items in file order: their kept attributes, cut to max_attr_chars, and their text hash."""
        columns = [ITEM_ID, *(self.cfg.attributes or attribute_columns(self.raw.items.columns))]
        row = written = 0
        for batch in self.raw.items.batches(columns):
            table = pa.Table.from_batches([batch]).filter(pa.array(self.kept[row:row + batch.num_rows]))
            row += batch.num_rows
            if self.cfg.max_attr_chars:
                for i, name in enumerate(table.column_names[1:], start=1):
                    table = table.set_column(i, name, pc.utf8_slice_codeunits(table[name], 0, self.cfg.max_attr_chars))
            refuse_undescribed_items(table, f"{self.source} (items)", written)
            written += table.num_rows
            if table.num_rows:
                yield with_text_hash(table)


def preprocess(raw: RawDataset, cfg: DatasetConfig, source: str, workdir: Path,
               rows_per_bucket: int = ROWS_PER_BUCKET) -> Prepared:
    """Validates the raw dataset (errors name `source`'s file and row) and filters it into spill files under
    `workdir`; nothing is written to the store."""
    unknown = [a for a in cfg.attributes if a not in raw.items.columns]
    if unknown:
        raise DataError(f"dataset.attributes: {unknown[0]!r} is not an item column (have {raw.items.columns})")
    item_ids = _column(raw.items, ITEM_ID)
    validate_catalog_ids(raw.items.columns, item_ids, f"{source} (items)")
    users, unit, rows = _scan_users_and_timestamps(raw.interactions, cfg.timestamp_unit)
    num_buckets = max(1, -(-rows // rows_per_bucket))
    spilled, counts = _spill(raw.interactions, item_ids, users, unit, num_buckets, workdir, f"{source} (interactions)")
    keep_item = _most_popular(counts, item_ids, cfg.max_items) if cfg.max_items else np.ones(len(item_ids), dtype=bool)
    if cfg.k_core:
        keep_item = _k_core(spilled, keep_item, cfg.k_core)
    buckets, num_users, num_interactions, present = [], 0, 0, np.zeros(len(item_ids), dtype=bool)
    for i, path in enumerate(spilled):
        spill = _finish(_read(path), keep_item, cfg)
        num_users += len(np.unique(spill["user"]))
        num_interactions += len(spill)
        present[spill["item"].to_numpy()] = True
        buckets.append(_write(spill, workdir / f"sorted-{i:05d}.arrow"))
        path.unlink()
    if not num_interactions:
        raise DataError(f"dataset {cfg.name!r}: filtering (k_core={cfg.k_core}, min_seq_len={cfg.min_seq_len}, "
                        f"max_items={cfg.max_items}) leaves no interactions")
    filtered = bool(cfg.max_items or cfg.k_core or cfg.min_seq_len or cfg.max_seq_len)
    # items that lost every interaction leave the catalog too, as in the paper's data
    kept = present if filtered else np.ones(len(item_ids), dtype=bool)
    return Prepared(raw, cfg, source, item_ids, kept, users, buckets, num_users, num_interactions)


def _column(table: RawTable, name: str) -> pa.Array:
    chunks = [batch.column(0) for batch in table.batches([name])]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _scan_users_and_timestamps(inter: RawTable, unit: str) -> tuple[pa.Array, str, int]:
    """The first pass: the sorted distinct users, the timestamps' unit (checking every value) and the row count."""
    scan = TimestampScan(inter.path, inter.position, unit)
    distinct = []
    for batch in inter.batches([USER_ID, TIMESTAMP]):
        scan.add(batch.column(TIMESTAMP))
        distinct.append(pc.unique(batch.column(USER_ID)))
    users = pc.unique(pa.concat_arrays(distinct)) if distinct else pa.array([], pa.string())
    return users.take(pc.sort_indices(users)), scan.unit(), scan.rows


def _spill(inter: RawTable, item_ids: pa.Array, users: pa.Array, unit: str, num_buckets: int, workdir: Path,
           source: str) -> tuple[list[Path], np.ndarray]:
    """The second pass: every interaction as integers into the bucket of its user's range; the interactions
    per catalog row. Refuses an interaction whose item is not in the catalog."""
    paths = [workdir / f"spill-{b:05d}.arrow" for b in range(num_buckets)]
    writers = [pa.ipc.new_file(str(path), SPILL) for path in paths]
    counts = np.zeros(len(item_ids), dtype=np.int64)
    row, unknown, first_unknown = 0, 0, None
    for batch in inter.batches([USER_ID, ITEM_ID, TIMESTAMP]):
        item = _positions(batch.column(ITEM_ID), item_ids)
        missing = item < 0
        if missing.any():
            unknown += int(missing.sum())
            if first_unknown is None:
                at = int(missing.argmax())
                first_unknown = (row + at, batch.column(ITEM_ID)[at].as_py())
        row += batch.num_rows
        if unknown:
            continue  # counted for the message; nothing more to write
        user = _positions(batch.column(USER_ID), users)
        counts += np.bincount(item, minlength=len(item_ids))
        bucket = user.astype(np.int64) * num_buckets // max(len(users), 1)
        order = np.argsort(bucket, kind="stable")
        spill = pa.record_batch([user[order].astype(np.int32), item[order].astype(np.int32), to_seconds(batch.column(TIMESTAMP), unit)[order]], schema=SPILL)
        ends = np.cumsum(np.bincount(bucket, minlength=num_buckets))
        for b, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
            if end > start:
                writers[b].write_batch(spill.slice(start, end - start))
    for writer in writers:
        writer.close()
    if unknown:
        at, item = first_unknown
        raise DataError(f"{source}: row {at} names item {item!r}, which is not in the catalog ({unknown} such rows)")
    return paths, counts


def _positions(values: pa.Array, universe: pa.Array) -> np.ndarray:
    """Each value's position in `universe` (distinct values), -1 where it is absent. The hash table is built
    over the batch's distinct values, not over the universe: rebuilding one of the whole catalog per batch
    would cost more than the rest of the import."""
    encoded = pc.dictionary_encode(values)
    found = pc.index_in(universe, value_set=encoded.dictionary)
    matched = pc.is_valid(found)
    position = np.full(len(encoded.dictionary), -1, dtype=np.int64)
    position[pc.filter(found, matched).to_numpy()] = np.flatnonzero(matched.to_numpy(zero_copy_only=False))
    return position[encoded.indices.to_numpy()]


def _most_popular(counts: np.ndarray, item_ids: pa.Array, n: int) -> np.ndarray:
    """The n items with the most interactions (ties: the smaller item id)."""
    rank = np.empty(len(item_ids), dtype=np.int64)
    rank[pc.sort_indices(item_ids).to_numpy()] = np.arange(len(item_ids))
    candidates = np.flatnonzero(counts)
    popular = candidates[np.lexsort((rank[candidates], -counts[candidates]))[:n]]
    keep = np.zeros(len(item_ids), dtype=bool)
    keep[popular] = True
    return keep


def _k_core(buckets: list[Path], keep_item: np.ndarray, k: int) -> np.ndarray:
    """The items of the k-core among `keep_item`: users and items with fewer than k interactions are dropped
    until none is left to drop. A user's rows all lie in one bucket, so users are decided bucket by bucket;
    items are decided after each sweep over all buckets. The k-core is unique, so the order of drops does
    not change the result."""
    while True:
        counts = np.zeros(len(keep_item), dtype=np.int64)
        for path in buckets:
            spill = _read(path)
            item = spill["item"].to_numpy()
            counts += np.bincount(item[_core_rows(spill, keep_item, k)], minlength=len(keep_item))
        thin = (counts > 0) & (counts < k)
        keep_item = keep_item & (counts >= k)
        if not thin.any():
            return keep_item


def _core_rows(spill: pa.Table, keep_item: np.ndarray, k: int) -> np.ndarray:
    """Rows on a kept item whose user has at least k of them."""
    keep = keep_item[spill["item"].to_numpy()]
    if not k or not keep.any():
        return keep
    user = spill["user"].to_numpy()
    sizes = np.bincount(user[keep] - user.min(), minlength=user.max() - user.min() + 1)
    return keep & (sizes[user - user.min()] >= k)


def _finish(spill: pa.Table, keep_item: np.ndarray, cfg: DatasetConfig) -> pa.Table:
    """One bucket's kept rows, sorted stably by (user, timestamp), then the sequence-length limits."""
    spill = spill.filter(pa.array(_core_rows(spill, keep_item, cfg.k_core)))
    user, stamp = spill["user"].to_numpy(), spill[TIMESTAMP].to_numpy()
    spill = spill.take(np.lexsort((stamp, user)))
    if not len(spill) or not (cfg.max_seq_len or cfg.min_seq_len):
        return spill
    user = spill["user"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    events = np.diff(np.r_[starts, len(user)])  # per user, in order
    keep = np.ones(len(user), dtype=bool)
    if cfg.max_seq_len:  # each user's most recent events
        keep &= np.repeat(starts + events, events) - np.arange(len(user)) - 1 < cfg.max_seq_len
    if cfg.min_seq_len:
        keep &= np.repeat(np.minimum(events, cfg.max_seq_len or events) >= cfg.min_seq_len, events)
    return spill.filter(pa.array(keep))


def _write(table: pa.Table, path: Path) -> Path:
    with pa.ipc.new_file(str(path), SPILL) as writer:
        writer.write_table(table)
    return path


def _read(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as f:
        return pa.ipc.open_file(f).read_all()
