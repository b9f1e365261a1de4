"""User sequences for sequential recommenders: chronological order, leave-one-out split, length-bucketed batches.

Items are numbered 1..N in catalog order; 0 is padding, so row k of every item table
is item k. Sequences are held as two arrays (`Ragged`: every user's items end to end and
where each user starts), never a Python object per user or per event, so they grow with
the events and travel to Ray workers as two buffers. Batches are left-padded only to their
longest sequence: Amazon-style sequences average about 9 items, and padding all of them to
200 (as the reference does) spends almost all compute on padding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist.data.catalog import ITEM_ID, TIMESTAMP, USER_ID
from llmemb_dist.storage import DataError

log = logging.getLogger(__name__)

MIN_EVENTS = 3  # one training item, one validation item, one test item
BUCKET_BATCHES = 50  # batches per length-sorted chunk: short padding, yet random batch composition


def _within(lengths: np.ndarray) -> np.ndarray:
    """0 .. lengths[r] - 1 for every row r, end to end: each value's position in its row."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions starts[r] .. starts[r] + lengths[r] - 1 of every row r, end to end."""
    return np.repeat(starts, lengths) + _within(lengths)


@dataclass
class Ragged:
    """Rows of different lengths in compressed sparse row form: row r is values[offsets[r]:offsets[r + 1]]."""

    values: np.ndarray  # int64
    offsets: np.ndarray  # int64, one more than there are rows

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        """`values` cut into consecutive rows of `lengths`."""
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray]) -> Ragged:
        values = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        return cls.from_lengths(values, np.array([len(r) for r in rows], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row]: self.offsets[row + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[r] for r in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray | Sequence[int]) -> Ragged:
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        return Ragged.from_lengths(self.values[_segments(self.offsets[rows], lengths)], lengths)

    def trim(self, drop_last: int = 0, keep_last: int = 0) -> Ragged:
        """Every row without its last `drop_last` values, then (with keep_last > 0) only its last `keep_last`."""
        ends = np.maximum(self.offsets[1:] - drop_last, self.offsets[:-1])
        starts = np.maximum(self.offsets[:-1], ends - keep_last) if keep_last else self.offsets[:-1]
        lengths = ends - starts
        return Ragged.from_lengths(self.values[_segments(starts, lengths)], lengths)

    def row_index(self) -> np.ndarray:
        """The row of every value."""
        return np.repeat(np.arange(len(self)), self.lengths)


@dataclass
class Sequences:
    """Each user's full chronological sequence of item indices (1..N): `events[u]` is user u's."""

    events: Ragged
    num_items: int
    item_ids: list[str] | None = None  # item_ids[k - 1] is item k; None in `indices_only()`
    user_ids: pa.Array | None = None
    dropped_users: int = 0

    @classmethod
    def from_rows(cls, item_ids: list[str], user_ids: list[str], seqs: Sequence[np.ndarray],
                  dropped_users: int = 0) -> Sequences:
        return cls(Ragged.from_rows(seqs), len(item_ids), list(item_ids), pa.array(user_ids, pa.string()), dropped_users)

    def indices_only(self) -> Sequences:
        """The same sequences without the ids: what training needs, shipped to each Ray Train worker as a few
        buffers rather than a Python string per item."""
        return Sequences(self.events, self.num_items, dropped_users=self.dropped_users)

    @property
    def num_users(self) -> int:
        return len(self.events)

    def split(self, name: str) -> tuple[Ragged, np.ndarray]:
        """Inputs and targets of 'valid' (second last item) or 'test' (last item), for every user."""
        cut = {"valid": 2, "test": 1}[name]
        return self.events.trim(drop_last=cut), self.events.values[self.events.offsets[1:] - cut].astype(np.int64)

    def train_popularity(self) -> np.ndarray:
        """Training interactions per item index (index 0, padding, stays 0)."""
        return np.bincount(self.events.trim(drop_last=2).values, minlength=self.num_items + 1).astype(np.int64)


def build_sequences(interactions: pa.Table, item_ids: list[str], source: str = "interactions") -> Sequences:
    """Sorts each user's events by time (ties keep input order; users in id order); users with < 3 events
    are dropped and counted. Arrow does the lookups and the sort: no Python object is made per event."""
    table = interactions.select([USER_ID, ITEM_ID, TIMESTAMP]).combine_chunks()
    codes = pc.index_in(table.column(ITEM_ID), value_set=pa.array(item_ids, pa.string())).combine_chunks()
    if codes.null_count:
        row = int(np.flatnonzero(codes.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{source}: row {row}: item_id {table.column(ITEM_ID)[row].as_py()!r} is not in the catalog")
    # Arrow's sort is stable: events at the same time keep their input order.
    order = pc.sort_indices(table, sort_keys=[(USER_ID, "ascending"), (TIMESTAMP, "ascending")])
    users = table.column(USER_ID).take(order).combine_chunks()
    items = codes.take(order).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    changed = pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.concatenate([[len(items) > 0], changed]))
    lengths = np.diff(np.append(starts, len(items)))
    kept = lengths >= MIN_EVENTS
    dropped = int((~kept).sum())
    if dropped:
        log.warning("%s: dropped %d users with fewer than %d events", source, dropped, MIN_EVENTS)
    if not kept.any():
        raise DataError(f"{source}: no user has {MIN_EVENTS} or more events, so there is nothing to validate on")
    events = Ragged.from_lengths(items[np.repeat(kept, lengths)], lengths[kept])
    user_ids = pc.cast(users.take(pa.array(starts[kept])), pa.string())
    return Sequences(events, len(item_ids), list(item_ids), user_ids, dropped)


def pad_left(seqs: Ragged | Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """The last `max_len` items of each sequence, left-padded with 0 to the batch's longest."""
    rows = (seqs if isinstance(seqs, Ragged) else Ragged.from_rows(seqs)).trim(keep_last=max_len)
    lengths = rows.lengths
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    out = np.zeros((len(rows), width), dtype=np.int64)
    out[rows.row_index(), width - np.repeat(lengths, lengths) + _within(lengths)] = rows.values
    return out


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches: shuffle, sort chunks of BUCKET_BATCHES batches by length, cut, shuffle the batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start: start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_inputs(data: Sequences, max_len: int) -> Ragged:
    """Training sequences (each user's items before validation), cut to max_len + 1 so
    that an input of max_len items still has a next item at every position."""
    return data.events.trim(drop_last=2, keep_last=max_len + 1)
