"""The cold-start split and evaluation: no cold item reaches training or validation, cold targets are ranked
among every item, and the cold items' vectors in RAT's cold-start figures are the ones adapt publishes."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmemb_dist import storage
from llmemb_dist.config import EvalConfig, load_config
from llmemb_dist.data.cold import choose_cold, cold_split
from llmemb_dist.data.embeddings import embeddings_table, vectors_of
from llmemb_dist.data.sequences import Sequences, train_inputs
from llmemb_dist.layout import dataset_uri, embeddings_uri
from llmemb_dist.srs.placement import NEW_ITEM_SCALE, ItemPlacement
from llmemb_dist.stages.adapt.driver import adapt
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.cold import text_only_metrics
from llmemb_dist.stages.rat.driver import PLACEMENT_DIR, rat
from llmemb_dist.stages.rat.inputs import load_cold_split, load_sequences

from conftest import start_local_ray


def handmade() -> Sequences:
    seqs = [[1, 2, 3, 4, 5], [2, 6, 3, 7], [5, 4, 2, 6, 1, 8], [8, 7, 6, 5], [3, 2, 8, 1], [3, 8, 1]]
    return Sequences.from_rows([f"i{k}" for k in range(1, 9)], [f"u{u}" for u in range(6)], [np.array(s) for s in seqs])


def test_no_cold_item_reaches_any_training_or_validation_input():
    data = handmade()
    cold = np.zeros(9, dtype=bool)
    cold[[3, 8]] = True  # i3 and i8
    split = cold_split(data, cold)
    cold_ids = {"i3", "i8"}
    warm_ids = split.warm.item_ids
    assert cold_ids.isdisjoint(warm_ids) and split.item_ids[split.num_warm:] == ["i3", "i8"]
    seen = []
    inputs, targets = split.warm.split("valid")
    for u in range(split.warm.num_users):
        seen += [warm_ids[k - 1] for k in split.warm.events.trim(drop_last=2)[u]] + [warm_ids[k - 1] for k in inputs[u]]
        seen.append(warm_ids[targets[u] - 1])
    seen += [warm_ids[k - 1] for s in train_inputs(split.warm, 50) for k in s]
    assert seen and cold_ids.isdisjoint(seen)
    assert all(k <= split.num_warm for s in split.test_inputs for k in s)  # test inputs are warm too
    # u2's next item is i8 (cold); u4's is i1 after i3, i2, i8, of which only i2 stays in the history;
    # u5 has no warm history at all, so there is nothing to rank for.
    test_ids = [split.item_ids[t - 1] for t in split.test_targets]
    assert test_ids == ["i5", "i7", "i8", "i5", "i1"]
    assert split.cold_target.tolist() == [False, False, True, False, False]
    # A user whose test item is cold trains on the history alone: u2 keeps 5 warm events, none after i8.
    assert [warm_ids[k - 1] for k in split.warm.events[2]] == ["i5", "i4", "i2", "i6", "i1"]
    # u4 has a single warm event before the test item: too short to train on, still a test user.
    assert "u4" not in split.warm.user_ids.to_pylist() and [split.item_ids[k - 1] for k in split.test_inputs[4]] == ["i2"]


def test_cold_items_are_a_seeded_fraction_or_those_first_seen_after_a_time():
    data = handmade()
    picked = choose_cold(data, 0.25, seed=3)
    assert picked.sum() == 2 and not picked[0]
    assert np.array_equal(picked, choose_cold(data, 0.25, seed=3))
    first_seen = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80], dtype=float)
    assert np.flatnonzero(choose_cold(data, 0.25, 0, first_seen, after=65)).tolist() == [7, 8]
    with pytest.raises(storage.DataError, match="cold-start split"):
        choose_cold(data, 0.25, 0, first_seen, after=100)


def test_text_only_reference_ranks_the_most_similar_item_first():
    data = handmade()
    cold = np.zeros(9, dtype=bool)
    cold[8] = True
    split = cold_split(data, cold)
    # Every item's vector equals its test successor's for u2 (last warm item i1, next item i8): rank 0.
    llm = np.eye(8, dtype=np.float32)
    row = {item: r for r, item in enumerate(split.item_ids)}
    llm[row["i8"]] = llm[row["i1"]] + 0.01
    metrics = text_only_metrics(llm, split, EvalConfig(ks=[1]), max_len=10)
    assert metrics["cold"]["users"] == 1 and metrics["cold"]["HR@1"] == 1.0


DIM = 8
SETTINGS = ["dataset.max_items=60", "rat.max_len=20", "rat.hidden=16", "rat.adapter_hidden=24", "rat.epochs=2",
            "rat.patience=2", f"rat.embedding_dim={DIM}", "rat.item_repr=llm_gate", "rat.embeddings=v1",
            "rat.eval.num_negatives=20", "rat.loss=ce", "rat.cold.enabled=true", "rat.cold.fraction=0.2"]


@pytest.mark.slow
def test_rat_with_a_cold_split_scores_cold_items_as_adapt_places_them(tmp_path, s3_server):
    start_local_ray()
    cfg = load_config(None, [f"root={tmp_path}", *SETTINGS])
    prepare(cfg)
    catalog = storage.read_table(dataset_uri(cfg), "catalog")
    ids, hashes = catalog.column("item_id").to_pylist(), catalog.column("text_hash").to_pylist()
    vectors = np.random.default_rng(0).normal(size=(len(ids), DIM)).astype(np.float32)
    with storage.publish(embeddings_uri(cfg, "v1"), kind="embeddings", config={}, config_hash="test") as pub:
        pub.write_table("embeddings", embeddings_table(pa.array(ids, pa.string()), pa.array(hashes, pa.string()), vectors))
        pub.info.update(dim=DIM, encoder="enc", base_model={"path": "base", "fingerprint": "base"})
    uri = rat(cfg)

    split = load_cold_split(cfg, load_sequences(cfg))
    cold_ids = split.item_ids[split.num_warm:]
    published = storage.read_table(uri, "item_embeddings").column("item_id").to_pylist()
    assert sorted(published) == sorted(split.warm.item_ids)  # RAT trained and published the warm items only
    data = storage.data_uri(uri, storage.read_manifest(uri))
    metrics = json.loads(storage.read_bytes(storage.join(data, "report", "metrics.json")))
    cold_start = metrics["cold_start"]
    assert set(cold_start) == {"sasrec-id", "sasrec-llm_gate", "text-only"}
    assert "report/cold_start.png" in storage.read_manifest(uri)["files"]
    for groups in cold_start.values():
        assert groups["cold"]["users"] == int(split.cold_target.sum()) > 0
        assert groups["overall"]["users"] == groups["warm"]["users"] + groups["cold"]["users"]

    # adapt over the same embeddings gives the cold items what the placement gives an item without interactions.
    adapted = adapt(load_config(None, [f"root={tmp_path}", *SETTINGS, "adapt.version=today", "adapt.embeddings=v1"]))
    by_id = dict(zip(*(lambda t: (t.column("item_id").to_pylist(), vectors_of(t)))(storage.read_table(adapted, "item_embeddings"))))
    placement = ItemPlacement.load(storage.download_dir(storage.join(data, PLACEMENT_DIR), tmp_path / "placement"))
    row = {item: r for r, item in enumerate(ids)}
    expected = placement.items.with_llm(torch.from_numpy(vectors[[row[i] for i in cold_ids]]),
                                        torch.zeros(len(cold_ids), dtype=torch.long)) * placement.spec[NEW_ITEM_SCALE]
    assert placement.spec[NEW_ITEM_SCALE] >= 1.0  # calibrated by RAT (stages/rat/calibrate.py)
    assert np.allclose(np.stack([by_id[i] for i in cold_ids]), expected.detach().numpy(), atol=1e-6)
