import logging

import numpy as np
import pyarrow as pa
import pytest

from llmemb_dist.data.sequences import Ragged, bucketed_batches, build_sequences, pad_left, train_inputs
from llmemb_dist.storage import DataError


def interactions(rows):
    users, items, times = zip(*rows)
    return pa.table({"user_id": list(users), "item_id": list(items), "timestamp": pa.array(times, pa.int64())})


def test_leave_one_out_on_a_handmade_dataset(caplog):
    table = interactions([
        ("u1", "c", 30), ("u1", "a", 10), ("u1", "b", 20), ("u1", "d", 40),
        ("u2", "b", 5), ("u2", "a", 5), ("u2", "c", 1),  # a tie at 5: input order (b before a) holds
        ("u3", "a", 1), ("u3", "b", 2),  # two events: dropped and counted
    ])
    with caplog.at_level(logging.WARNING):
        data = build_sequences(table, ["a", "b", "c", "d"])
    assert data.user_ids.to_pylist() == ["u1", "u2"] and data.dropped_users == 1
    assert "dropped 1 users" in caplog.text
    assert [s.tolist() for s in data.events] == [[1, 2, 3, 4], [3, 2, 1]]
    assert [s.tolist() for s in data.events.trim(drop_last=2)] == [[1, 2], [3]]
    inputs, targets = data.split("valid")
    assert [s.tolist() for s in inputs] == [[1, 2], [3]] and targets.tolist() == [3, 2]
    inputs, targets = data.split("test")
    assert [s.tolist() for s in inputs] == [[1, 2, 3], [3, 2]] and targets.tolist() == [4, 1]
    assert data.train_popularity().tolist() == [0, 1, 1, 1, 0]


def test_no_user_left_for_validation_is_a_clear_error():
    with pytest.raises(DataError, match="no user has 3 or more events"):
        build_sequences(interactions([("u1", "a", 1), ("u1", "b", 2)]), ["a", "b"])


def test_unknown_item_names_the_row():
    with pytest.raises(DataError, match="row 1: item_id 'zz'"):
        build_sequences(interactions([("u1", "a", 1), ("u1", "zz", 2)]), ["a"])


def test_pad_left_to_the_longest_in_the_batch_and_cut_to_max_len():
    seqs = [np.array([1, 2]), np.array([3, 4, 5, 6])]
    assert pad_left(seqs, 10).tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert pad_left(seqs, 3).tolist() == [[0, 1, 2], [4, 5, 6]]


def test_bucketed_batches_cover_every_sequence_once_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    batches = bucketed_batches(lengths, 16, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    # Sorted chunks: far less padding than random batches.
    waste = sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches)
    assert waste < 0.2 * lengths.sum()


def test_train_inputs_keep_max_len_plus_one_items():
    data = build_sequences(interactions([("u", str(i), i) for i in range(10)]), [str(i) for i in range(10)])
    assert train_inputs(data, 3)[0].tolist() == [5, 6, 7, 8]


def test_ragged_rows_take_and_trim_handle_empty_rows():
    rows = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4]), np.array([5, 6, 7, 8])]
    ragged = Ragged.from_rows(rows)
    assert [r.tolist() for r in ragged] == [r.tolist() for r in rows] and ragged.lengths.tolist() == [3, 0, 1, 4]
    assert [r.tolist() for r in ragged.take([3, 1, 0])] == [[5, 6, 7, 8], [], [1, 2, 3]]
    assert [r.tolist() for r in ragged.trim(drop_last=1)] == [[1, 2], [], [], [5, 6, 7]]
    assert [r.tolist() for r in ragged.trim(drop_last=1, keep_last=2)] == [[1, 2], [], [], [6, 7]]
    assert ragged.row_index().tolist() == [0, 0, 0, 2, 3, 3, 3, 3]
    assert pad_left(ragged.take([1, 2]), 5).tolist() == [[0], [4]]


def test_sequences_equal_a_per_user_sort_on_random_events():
    """The vectorised build against the obvious one: each user's events sorted by time, ties in input order."""
    rng = np.random.default_rng(3)
    n = 2000
    users = [f"u{k}" for k in rng.integers(0, 300, n)]
    items = [str(k) for k in rng.integers(0, 50, n)]
    times = rng.integers(0, 20, n)  # many ties
    data = build_sequences(interactions(list(zip(users, items, times.tolist()))), [str(k) for k in range(50)])
    expected = {}
    for order, (user, item, time) in enumerate(zip(users, items, times)):
        expected.setdefault(user, []).append((time, order, int(item) + 1))
    kept = {u: [i for _, _, i in sorted(ev)] for u, ev in sorted(expected.items()) if len(ev) >= 3}
    assert data.user_ids.to_pylist() == list(kept)
    assert [s.tolist() for s in data.events] == list(kept.values())
    assert data.dropped_users == len(expected) - len(kept)
    popularity = np.zeros(51, dtype=np.int64)
    for seq in kept.values():
        np.add.at(popularity, seq[:-2], 1)
    assert data.train_popularity().tolist() == popularity.tolist()
