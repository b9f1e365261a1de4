"""User sequences for sequential recommenders: chronological order, leave-one-out split, length-bucketed batches.

Items are numbered 1..N in catalog order; 0 is padding, so row k of every item table
is item k. Batches are left-padded only to their longest sequence: Amazon-style
sequences average about 9 items, and padding all of them to 200 (as the reference
does) spends almost all compute on padding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from llmemb_dist.data.catalog import ITEM_ID, TIMESTAMP, USER_ID
from llmemb_dist.storage import DataError

log = logging.getLogger(__name__)

MIN_EVENTS = 3  # one training item, one validation item, one test item
BUCKET_BATCHES = 50  # batches per length-sorted chunk: short padding, yet random batch composition


@dataclass
class Sequences:
    """Each user's full chronological sequence of item indices (1..N)."""

    item_ids: list[str]  # item_ids[k - 1] is item k
    user_ids: list[str]
    seqs: list[np.ndarray]
    dropped_users: int = 0

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def train(self, u: int) -> np.ndarray:
        return self.seqs[u][:-2]

    def split(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Inputs and targets of 'valid' (second last item) or 'test' (last item), for every user."""
        cut = {"valid": 2, "test": 1}[name]
        return [s[: len(s) - cut] for s in self.seqs], np.array([s[len(s) - cut] for s in self.seqs], dtype=np.int64)

    def train_popularity(self) -> np.ndarray:
        """Training interactions per item index (index 0, padding, stays 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for u in range(len(self.seqs)):
            np.add.at(counts, self.train(u), 1)
        return counts


def build_sequences(interactions: pa.Table, item_ids: list[str], source: str = "interactions") -> Sequences:
    """Sorts each user's events by time (ties keep input order); users with < 3 events are dropped and counted."""
    index = {item: k + 1 for k, item in enumerate(item_ids)}
    df = interactions.select([USER_ID, ITEM_ID, TIMESTAMP]).to_pandas()
    codes = df[ITEM_ID].map(index)
    unknown = codes.isna()
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{source}: row {row}: item_id {df[ITEM_ID].iloc[row]!r} is not in the catalog")
    df = df.assign(item=codes.astype(np.int64), order=np.arange(len(df)))
    df = df.sort_values([USER_ID, TIMESTAMP, "order"], kind="stable")
    users, starts = np.unique(df[USER_ID].to_numpy(), return_index=True)
    items = df["item"].to_numpy()
    bounds = list(starts) + [len(items)]
    seqs, kept, dropped = [], [], 0
    for u, user in enumerate(users):
        seq = items[bounds[u]: bounds[u + 1]]
        if len(seq) < MIN_EVENTS:
            dropped += 1
            continue
        seqs.append(seq)
        kept.append(str(user))
    if dropped:
        log.warning("%s: dropped %d users with fewer than %d events", source, dropped, MIN_EVENTS)
    if not seqs:
        raise DataError(f"{source}: no user has {MIN_EVENTS} or more events, so there is nothing to validate on")
    return Sequences(item_ids=list(item_ids), user_ids=kept, seqs=seqs, dropped_users=dropped)


def pad_left(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """The last `max_len` items of each sequence, left-padded with 0 to the batch's longest."""
    width = max(1, min(max_len, max(len(s) for s in seqs)))
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-width:]
        if len(s):
            out[i, width - len(s):] = s
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


def train_inputs(data: Sequences, max_len: int) -> list[np.ndarray]:
    """Training sequences (each user's items before validation), cut to max_len + 1 so
    that an input of max_len items still has a next item at every position."""
    return [data.train(u)[-(max_len + 1):] for u in range(len(data.seqs))]
