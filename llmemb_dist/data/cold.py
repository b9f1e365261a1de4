"""The cold-start split: some items are held out of every training and validation sequence, as items that
arrive after the recommender was trained, and test users whose next item is one of them measure what a
representation gives an item nobody has interacted with.

The recommender trains on `warm`, whose index holds the warm items only (1..W, in catalog order), exactly
as RAT trains on today's active items. The test split ranks over every item: the warm ones keep their
index and the cold ones follow (W+1..W+C), so a model's item table extended by the cold items' vectors
scores them all. A user's test input is the history before the test item with the cold items taken out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from llmemb_dist.data.sequences import MIN_EVENTS, Ragged, Sequences
from llmemb_dist.storage import DataError


@dataclass
class ColdSplit:
    warm: Sequences  # what the recommender trains and validates on
    item_ids: list[str]  # the test index: item_ids[k - 1] is item k, warm items first, then the cold ones
    num_warm: int
    test_inputs: Ragged  # warm items only, so they index the warm model as they are
    test_targets: np.ndarray  # in the test index

    @property
    def cold_target(self) -> np.ndarray:
        return self.test_targets > self.num_warm


def choose_cold(data: Sequences, fraction: float, seed: int, first_seen: np.ndarray | None = None,
                after: float = 0.0) -> np.ndarray:
    """Boolean per item index (0 is padding): a seeded `fraction` of the items, or, with `after` > 0, the
    items whose first interaction (`first_seen`, per index) is later than `after`."""
    cold = np.zeros(data.num_items + 1, dtype=bool)
    if after > 0:
        if first_seen is None:
            raise ValueError("a time cutoff needs each item's first interaction time")
        cold[1:] = np.asarray(first_seen)[1:] > after
    else:
        count = max(1, round(fraction * data.num_items))
        cold[np.random.default_rng(seed).choice(data.num_items, size=count, replace=False) + 1] = True
    if not cold.any() or cold[1:].all():
        raise DataError(f"the cold-start split leaves {int(cold.sum())} cold and {int((~cold[1:]).sum())} warm "
                        "items; it needs some of each (rat.cold.fraction or rat.cold.first_seen_after)")
    return cold


def cold_split(data: Sequences, cold: np.ndarray) -> ColdSplit:
    """Splits `data` (every user's full sequence) with `cold` (boolean per item index) held out.

    A user's warm sequence is their history without cold items, ending in the test item when that is warm:
    then validation is the last warm item before the test item, and training what precedes it, as in the
    leave-one-out split. When the test item is cold, the warm sequence is the history alone, so neither
    the cold item nor anything after it in time reaches training or validation.
    """
    warm_index = np.zeros(data.num_items + 1, dtype=np.int64)
    warm_items = np.flatnonzero(~cold[1:]) + 1
    cold_items = np.flatnonzero(cold[1:]) + 1
    warm_index[warm_items] = np.arange(1, len(warm_items) + 1)
    test_index = warm_index.copy()
    test_index[cold_items] = len(warm_items) + np.arange(1, len(cold_items) + 1)
    seqs, users, test_inputs, test_targets = [], [], [], []
    for user, seq in enumerate(data.events):
        history = warm_index[seq[:-1][~cold[seq[:-1]]]]
        target = seq[-1]
        if len(history):
            test_inputs.append(history)
            test_targets.append(test_index[target])
        warm_seq = history if cold[target] else np.append(history, warm_index[target])
        if len(warm_seq) >= MIN_EVENTS:
            seqs.append(warm_seq)
            users.append(user)
    if not seqs:
        raise DataError(f"the cold-start split leaves no user with {MIN_EVENTS} or more warm events")
    item_ids = [data.item_ids[k - 1] for k in warm_items] + [data.item_ids[k - 1] for k in cold_items]
    warm = Sequences(Ragged.from_rows(seqs), len(warm_items), item_ids[: len(warm_items)],
                     data.user_ids.take(pa.array(users, pa.int64())), data.dropped_users + data.num_users - len(seqs))
    return ColdSplit(warm, item_ids, len(warm_items), Ragged.from_rows(test_inputs), np.array(test_targets, dtype=np.int64))
