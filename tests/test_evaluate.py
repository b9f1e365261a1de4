import logging
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmemb_dist.config import EvalConfig
from llmemb_dist.data.sequences import Sequences, build_sequences
from llmemb_dist.storage import DataError
from llmemb_dist.stages.rat.evaluate import (Scorer, evaluate, head_items, make_split, metrics_from_ranks, popularity_scorer,
                                           ranks, sample_negatives, sample_users, text_only_scorer)


def test_metrics_on_known_ranks():
    m = metrics_from_ranks(np.array([0, 1, 4, 9, 10]), [5, 10])
    assert m["HR@5"] == 3 / 5 and m["HR@10"] == 4 / 5
    assert math.isclose(m["NDCG@5"], (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert math.isclose(m["NDCG@10"], (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)


def small_data(num_items=30):
    rows = []
    for u in range(4):
        for t, item in enumerate([1 + u, 5 + u, 10 + u, 20 + u]):
            rows.append((f"u{u}", str(item), t))
    users, items, times = zip(*rows)
    table = pa.table({"user_id": list(users), "item_id": list(items), "timestamp": pa.array(times, pa.int64())})
    return build_sequences(table, [str(i) for i in range(1, num_items + 1)])


def test_ranks_under_both_protocols_on_a_handmade_scorer():
    data = small_data()
    cfg = EvalConfig(num_negatives=5, ks=[1, 5])
    split = make_split(data, "test", cfg)
    for u, seq in enumerate(data.events):  # negatives: distinct, never touched by the user
        assert len(set(split.negatives[u])) == 5 and not set(split.negatives[u]) & set(seq.tolist())
    # Scores = item index: the true item (20 + u) beats every item below it.
    scorer = Scorer(lambda seqs: torch.ones(len(seqs), 1), torch.arange(31, dtype=torch.float32)[:, None])
    got = ranks(scorer, split, np.arange(4), max_len=10)
    for u in range(4):
        target = 20 + u
        assert got["sampled"][u] == int((split.negatives[u] > target).sum())
        # Full: items above the target, none of them in the user's history (all history is below).
        assert got["full"][u] == 30 - target
    # Early stopping asks for one protocol only: the same ranks, without the other.
    for protocol in ("sampled", "full"):
        one = ranks(scorer, split, np.arange(4), max_len=10, protocols=(protocol,))
        assert list(one) == [protocol] and (one[protocol] == got[protocol]).all()


def test_ties_count_against_the_true_item_and_same_seed_same_negatives(caplog):
    data = small_data()
    cfg = EvalConfig(num_negatives=5, ks=[10])
    constant = Scorer(lambda seqs: torch.ones(len(seqs), 1), torch.zeros(31, 1))
    result = evaluate(constant, make_split(data, "valid", cfg), cfg, 10)
    assert result["sampled"]["overall"]["HR@10"] == 1.0  # 5 tied negatives: rank 5 < 10
    result = evaluate(constant, make_split(data, "valid", EvalConfig(num_negatives=5, ks=[1])), EvalConfig(ks=[1]), 10)
    assert result["sampled"]["overall"]["HR@1"] == 0.0 and result["full"]["overall"]["HR@1"] == 0.0
    # More negatives wanted than items a user never touched (26): the padding that fills the list is no rival,
    # and the log says so.
    with caplog.at_level(logging.WARNING, logger="llmemb_dist.stages.rat.evaluate"):
        crowded = make_split(data, "valid", EvalConfig(num_negatives=28))
    assert "4 of 4 users touched so many items that fewer than 28 are left" in caplog.text
    assert (crowded.negatives[:, 26:] == 0).all()
    assert (ranks(constant, crowded, np.arange(4), max_len=10, protocols=("sampled",))["sampled"] == 26).all()
    a, b = make_split(data, "valid", cfg), make_split(data, "valid", cfg)
    assert (a.negatives == b.negatives).all()


def test_more_negatives_than_the_catalog_has_is_refused():
    with pytest.raises(DataError, match=r"rat.eval.num_negatives=30, but the catalog has 30 items"):
        make_split(small_data(), "valid", EvalConfig(num_negatives=30))


def test_head_items_and_groups():
    pop = np.array([0, 5, 1, 9, 1, 0, 0, 0, 0, 0, 3])
    assert np.flatnonzero(head_items(pop, 0.2)).tolist() == [1, 3]
    data = small_data()
    split = make_split(data, "test", EvalConfig(num_negatives=5, head_fraction=0.2, short_user_max_len=2))
    assert split.short.all()  # two training events each
    result = evaluate(popularity_scorer(data.train_popularity()), split, EvalConfig(), 10)
    assert result["full"]["head"]["users"] + result["full"]["tail"]["users"] == 4


def test_a_true_item_whose_score_is_not_finite_ranks_last():
    """A diverged model's NaN compares false with every rival: it must not count as a hit."""
    data = small_data()
    cfg = EvalConfig(num_negatives=5, ks=[10])
    split = make_split(data, "valid", cfg)
    for bad in (float("nan"), float("inf")):
        scorer = Scorer(lambda seqs: torch.ones(len(seqs), 1), torch.full((31, 1), bad))
        got = ranks(scorer, split, np.arange(4), max_len=10)
        assert (got["sampled"] == 5).all() and (got["full"] == 30).all()
        result = evaluate(scorer, split, cfg, 10)
        assert result["sampled"]["overall"]["HR@10"] == 1.0  # 5 negatives: even last is in the top 10
        assert result["full"]["overall"]["NDCG@10"] == 0.0
    # NaN rivals never beat a finite true score.
    for u in range(4):
        table = torch.full((31, 1), float("nan"))
        table[split.targets[u]] = 1.0
        got = ranks(Scorer(lambda seqs: torch.ones(len(seqs), 1), table), split, np.array([u]), max_len=10)
        assert got["full"][0] == 0 and got["sampled"][0] == 0


def test_most_popular_ranks_by_training_counts_and_text_only_by_cosine_to_the_last_input():
    data = small_data()
    cfg = EvalConfig(num_negatives=5, ks=[10])
    split = make_split(data, "test", cfg)
    popularity = data.train_popularity()
    got = ranks(popularity_scorer(popularity), split, np.arange(4), max_len=10, protocols=("full",))["full"]
    for u in range(4):
        seen = set(split.inputs[u].tolist())
        target_count = popularity[split.targets[u]]
        rivals = [i for i in range(1, 31) if i not in seen and i != split.targets[u]]
        assert got[u] == sum(popularity[i] >= target_count for i in rivals)
    # Text-only: item k's vector is e_k plus a shared part, so the last input's nearest item is the one the
    # construction puts next to it.
    rng = np.random.default_rng(0)
    llm = rng.normal(size=(30, 8)).astype(np.float32)
    for u in range(4):
        last, target = split.inputs[u][-1], split.targets[u]
        llm[target - 1] = llm[last - 1] + 0.01 * rng.normal(size=8)  # the target is the last input's twin
    text = ranks(text_only_scorer(llm), split, np.arange(4), max_len=10, protocols=("full",))["full"]
    assert (text == 0).all()
    unit = llm / np.linalg.norm(llm, axis=1, keepdims=True)
    u = 0
    cos = unit @ unit[split.inputs[u][-1] - 1]
    seen = set(split.inputs[u].tolist())
    assert text[u] == sum(cos[i - 1] >= cos[split.targets[u] - 1] for i in range(1, 31)
                          if i not in seen and i != split.targets[u])


def test_full_ranking_counted_in_item_chunks_equals_one_pass_over_the_catalog(monkeypatch):
    from llmemb_dist.stages.rat import evaluate as module

    data = small_data()
    split = make_split(data, "test", EvalConfig(num_negatives=5))
    g = torch.Generator().manual_seed(0)
    items = torch.randn(31, 4, generator=g)
    scorer = Scorer(lambda seqs: torch.randn(len(seqs), 4, generator=torch.Generator().manual_seed(1)), items)
    whole = ranks(scorer, split, np.arange(4), max_len=10, protocols=("full",))["full"]
    users = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    for u in range(4):  # by hand: every item but padding, the inputs and the target that scores at least as high
        scores = (items @ users[u]).tolist()
        true = scores[split.targets[u]]
        rivals = set(range(1, 31)) - set(split.inputs[u].tolist()) - {int(split.targets[u])}
        assert whole[u] == sum(scores[i] >= true for i in rivals)
    for chunk in (1, 7, 30, 31):
        monkeypatch.setattr(module, "ITEM_CHUNK", chunk)
        assert (ranks(scorer, split, np.arange(4), max_len=10, protocols=("full",))["full"] == whole).all()


def test_a_seeded_sample_of_validation_users():
    data = small_data()
    split = make_split(data, "valid", EvalConfig(num_negatives=5))
    assert sample_users(split, 0, 1) is split and sample_users(split, 4, 1) is split
    two = sample_users(split, 2, seed=1)
    assert len(two.targets) == 2 and sample_users(split, 2, seed=1).targets.tolist() == two.targets.tolist()
    kept = [u for u in range(4) if split.targets[u] in two.targets]
    assert [s.tolist() for s in two.inputs] == [split.inputs[u].tolist() for u in kept]
    assert (two.negatives == split.negatives[kept]).all() and (two.head == split.head[kept]).all()


def test_negatives_are_distinct_untouched_items_and_a_user_short_of_them_gets_all_there_are(caplog):
    rng = np.random.default_rng(5)
    seqs = [rng.choice(np.arange(1, 41), size=rng.integers(3, 12), replace=False) for _ in range(300)]
    seqs.append(np.arange(1, 38))  # touched 37 of 40: only 3 left to draw
    data = Sequences.from_rows([str(i) for i in range(1, 41)], [f"u{u}" for u in range(len(seqs))], seqs)
    with caplog.at_level(logging.WARNING):
        negatives = sample_negatives(data, 10, np.random.default_rng(0))
    assert "1 of 301 users touched so many items" in caplog.text
    for seq, row in zip(seqs[:-1], negatives):
        assert len(set(row.tolist())) == 10 and 0 not in row and not set(row.tolist()) & set(seq.tolist())
    assert sorted(negatives[-1][:3].tolist()) == [38, 39, 40] and negatives[-1][3:].tolist() == [0] * 7
    assert (sample_negatives(data, 10, np.random.default_rng(0)) == negatives).all()
