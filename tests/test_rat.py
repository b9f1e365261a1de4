"""RAT on MovieLens-100K: bad inputs, every backbone learning, and the stage end to end on S3 through Ray Train."""
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from llmemb_dist import storage
from llmemb_dist.config import ConfigError, load_config
from llmemb_dist.stages.rat.evaluate import evaluate, make_split, popularity_scorer
from llmemb_dist.data.embeddings import load_llm_table, vectors_of
from llmemb_dist.stages.embed.actor import EmbedActor
from llmemb_dist.layout import dataset_uri, rat_result_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.driver import rat
from llmemb_dist.stages.rat.inputs import load_sequences
from llmemb_dist.stages.rat.objective import check_objective_fits
from llmemb_dist.stages.rat.trainer import TrainingDiverged, evaluate_shared, final_evaluation, fit
from llmemb_dist.stages.rat.worker import train_variant
from llmemb_dist.srs import build_model

FAST = ["rat.max_len=30", "rat.hidden=64", "rat.dropout=0.2", "rat.lr=0.003"]


def publish_embeddings(uri, item_ids, dim, seed=0):
    """A fixed random embedding table in the embedding stage's format (its values do not matter here)."""
    emb = np.random.default_rng(seed).normal(size=(len(item_ids), dim)).astype(np.float32)
    table = pa.table({
        "item_id": pa.array(item_ids, pa.string()),
        "text_hash": pa.array(["h"] * len(item_ids), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
    })
    with storage.publish(uri, kind="embeddings", config={}, config_hash="test") as pub:
        pub.write_table("embeddings", table)
    return emb


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    cfg = load_config(None, [f"root={tmp_path_factory.mktemp('runs')}"] + FAST)
    prepare(cfg)
    return cfg, load_sequences(cfg)


@pytest.fixture(scope="module")
def minilm_table(ml100k):
    """Mean-pooled MiniLM embeddings of the ml-100k catalog, computed by the embedding stage's actor code (no Ray)."""
    cfg, data = ml100k
    out = EmbedActor(cfg.model, None, batch_size=64, device="cpu", num_threads=2, fault_marker=None).embed_catalog(
        storage.read_table(dataset_uri(cfg), "catalog"))
    assert out.column("item_id").to_pylist() == data.item_ids
    return vectors_of(out)


def test_embeddings_missing_items_or_of_another_dimension_are_clear_errors(ml100k, tmp_path):
    cfg, data = ml100k
    publish_embeddings(str(tmp_path / "partial"), data.item_ids[:-3], 16)
    with pytest.raises(storage.DataError, match="3 of 1682 catalog items have no embedding"):
        load_llm_table(str(tmp_path / "partial"), data.item_ids)
    emb = publish_embeddings(str(tmp_path / "full"), data.item_ids[::-1], 16)
    with pytest.raises(storage.DataError, match="dimension 16, config rat.embedding_dim says 32"):
        load_llm_table(str(tmp_path / "full"), data.item_ids, expected_dim=32)
    table = load_llm_table(str(tmp_path / "full"), data.item_ids, expected_dim=16)
    assert np.array_equal(table, emb[::-1])  # rows follow the catalog, not the file


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
@pytest.mark.parametrize("item_repr", ["id", "llm"])
def test_each_backbone_beats_most_popular(ml100k, minilm_table, backbone, item_repr):
    cfg, data = ml100k
    epochs = 16 if backbone == "bert4rec" else 8  # masked-item training learns more slowly
    cfg = load_config(None, [f"root={cfg.root}"] + FAST + [f"rat.epochs={epochs}", f"rat.patience={epochs}"])
    # The real LLMEmb input: what MiniLM makes of each movie's title, year and genres.
    llm = minilm_table
    srs = np.random.default_rng(1).normal(size=(data.num_items + 1, 64)).astype(np.float32) * 0.1
    model = build_model(cfg.rat, backbone, item_repr, data.num_items, llm)
    result = fit(model, data, cfg.rat, srs=srs if item_repr == "llm" else None)
    popular = evaluate(popularity_scorer(data.train_popularity()), make_split(data, "valid", cfg.rat.eval), cfg.rat.eval,
                       cfg.rat.max_len)
    assert result.valid["sampled"]["overall"]["NDCG@10"] > popular["sampled"]["overall"]["NDCG@10"]
    assert len(result.history) <= epochs and 1 <= result.best_epoch <= len(result.history)


@pytest.mark.slow
@pytest.mark.parametrize("item_repr, text_weights", [("llm_id", "[0]"), ("llm_gate", "[0]"), ("id_llm_init", "[0]"),
                                                     ("llm", "[0,1,4,16]"), ("llm_gate", "[0,1,4,16]")])
def test_each_item_representation_beats_most_popular_under_full_ranking(ml100k, minilm_table, item_repr, text_weights):
    cfg, data = ml100k
    cfg = load_config(None, [f"root={cfg.root}"] + FAST + ["rat.epochs=6", "rat.patience=6", "rat.loss=ce",
                                                             "rat.eval.select_protocol=full", f"rat.text_weights={text_weights}"])
    model = build_model(cfg.rat, "sasrec", item_repr, data.num_items, minilm_table, data.train_popularity())
    result = fit(model, data, cfg.rat)
    valid = make_split(data, "valid", cfg.rat.eval)
    popular = evaluate(popularity_scorer(data.train_popularity()), valid, cfg.rat.eval, cfg.rat.max_len)
    assert result.valid["full"]["overall"]["NDCG@10"] > popular["full"]["overall"]["NDCG@10"]
    # The text channel's weight is the offered one with the best validation NDCG@10, and the figures are its.
    by_weight = {}
    for weight in cfg.rat.text_weights:
        model.text_weight = weight
        by_weight[weight] = evaluate_shared(model, valid, cfg.rat, 0, 1, ("full",))["full"]["overall"]["NDCG@10"]
    assert result.text_weight == max(by_weight, key=lambda w: (by_weight[w], -w))
    assert result.valid["full"]["overall"]["NDCG@10"] == pytest.approx(by_weight[result.text_weight])


@pytest.mark.slow
def test_rat_end_to_end_on_s3(s3_root, ray_local):
    cfg = load_config(None, [f"root={s3_root}", "rat.run=e2e", "rat.embeddings=toy", "rat.epochs=2",
                             "rat.max_len=30", "rat.hidden=32", "rat.adapter_hidden=48", "rat.embedding_dim=24"])
    prepare(cfg)
    data = load_sequences(cfg)
    publish_embeddings(storage.join(s3_root, "embeddings", "toy"), data.item_ids, 24)
    uri = rat(cfg)
    assert uri == rat_result_uri(cfg)
    manifest = storage.read_manifest(uri)
    assert manifest["kind"] == "rat" and manifest["embeddings_input"].endswith("/embeddings/toy")
    items = storage.read_table(uri, "item_embeddings")
    assert items.num_rows == 1682 and items.schema.field("embedding").type.list_size == 32
    assert items.column("item_id").to_pylist() == data.item_ids
    assert {"model/model.safetensors", "model/model_config.json", "report/metrics.json", "report/report.md",
            "report/head_tail.png", "report/valid_curve.png"} <= set(manifest["files"])
    metrics = json.loads(storage.read_bytes(storage.join(storage.data_uri(uri), "report/metrics.json")))
    main = f"sasrec-{cfg.rat.item_repr}"  # the default LLM item representation
    # The references and the ID-only baseline with and without the text channel, beside the LLMEmb model.
    names = {"most-popular", "text-only", "sasrec-id", "sasrec-id+text", main}
    assert set(metrics["variants"]) == names
    rows = manifest["metrics"]  # the comparison table the pipeline prints
    assert {(r["model"], r["protocol"]) for r in rows} == {(m, p) for m in names for p in ("sampled", "full")}
    assert all(0 <= r["tail NDCG@10"] <= 1 for r in rows)
    assert metrics["variants"]["sasrec-id"]["text_weight"] == 0.0
    comparison = manifest["comparison"]
    valid = {n: metrics["variants"][n]["valid"]["full"]["overall"]["NDCG@10"] for n in names - {main}}
    assert comparison["model"] == main and comparison["baseline"] == max(valid, key=valid.get)
    overall = comparison["groups"]["overall"]
    assert overall["model"] == pytest.approx(metrics["variants"][main]["test"]["full"]["overall"]["NDCG@10"])
    assert overall["baseline"] == pytest.approx(metrics["variants"][comparison["baseline"]]["test"]["full"]["overall"]["NDCG@10"])
    assert 0 < overall["p_value"] <= 1
    # The checkpointed, finished ID model is reused, not retrained.
    _, again = train_variant(cfg, data, "sasrec", "id")
    assert again.history == metrics["variants"]["sasrec-id"]["history"]
    assert rat(cfg) == uri and storage.read_manifest(uri) == manifest  # same config and inputs: nothing to do
    with pytest.raises(storage.AlreadyPublished, match="another config"):
        rat(dataclasses.replace(cfg, rat=dataclasses.replace(cfg.rat, alpha=0.5)))


def test_a_diverged_model_stops_with_one_error_naming_the_epoch_and_the_model(ml100k):
    cfg, data = ml100k
    rcfg = load_config(None, [f"root={cfg.root}"] + FAST + ["rat.lr=1.0e+30", "rat.epochs=3"]).rat
    model = build_model(rcfg, "sasrec", "id", data.num_items)
    with pytest.raises(TrainingDiverged, match=r"^rat sasrec-id: the training loss is nan in epoch 1: "):
        fit(model, data, rcfg, name="rat sasrec-id")


@pytest.mark.slow
def test_a_diverged_rat_run_is_one_clear_error_and_publishes_nothing(ray_local, tmp_path):
    cfg = load_config(None, [f"root={tmp_path}", "rat.item_repr=id", "rat.lr=1.0e+30", "rat.epochs=2"] + FAST[:2])
    prepare(cfg)
    with pytest.raises(storage.DataError, match=r"^rat sasrec-id: the training loss is nan in epoch 1: "):
        rat(cfg)
    assert not storage.is_published(rat_result_uri(cfg))


def test_id_only_with_the_text_channel_at_weight_0_is_id_only(ml100k, minilm_table):
    cfg, data = ml100k
    rcfg = load_config(None, [f"root={cfg.root}"] + FAST + ["rat.epochs=2", "rat.text_weights=[0,1,4,16]"]).rat
    torch.manual_seed(0)
    plain = build_model(rcfg, "sasrec", "id", data.num_items)
    torch.manual_seed(0)
    with_text = build_model(rcfg, "sasrec", "id", data.num_items, minilm_table)
    assert plain.text is None and with_text.text is not None
    assert fit(plain, data, rcfg).without_text is None
    blended = fit(with_text, data, rcfg)
    # The blended model scored at weight 0 is its weights scored as ID-only. The same weights, not a second
    # training: CPU training is not bit-reproducible (multi-threaded gradient sums), evaluation is.
    plain.load_state_dict(blended.best_state)
    valid, test = make_split(data, "valid", rcfg.eval), make_split(data, "test", rcfg.eval)
    alone = final_evaluation(plain, valid, test, rcfg, 0, 1)
    assert blended.without_text["test"] == alone["test"] and blended.without_text["valid"] == alone["valid"]
    assert (blended.without_text["test_ranks"] == alone["test_ranks"]).all()
    # Its weight is chosen on validation among the offered ones, 0 included.
    assert blended.text_weight in rcfg.text_weights
    assert blended.valid["full"]["overall"]["NDCG@10"] >= alone["valid"]["full"]["overall"]["NDCG@10"]


def test_ce_over_a_catalog_too_large_for_its_logits_is_refused_before_training(ml100k):
    cfg, data = ml100k
    bounded = load_config(None, [f"root={cfg.root}", "rat.run=ce-bound", "rat.item_repr=id",
                                 "rat.ce_max_logits_gib=0.01"] + FAST)
    # 128 sequences x 30 positions x 1683 rows x 4 bytes = 0.024 GiB
    with pytest.raises(ConfigError, match=r"rat.loss=ce over 1682 items would hold 0.02 GiB of logits a step .* "
                                          r"rat.ce_max_logits_gib=0.01: use rat.loss=sampled_softmax"):
        rat(bounded)
    assert not storage.is_published(rat_result_uri(bounded))
    check_objective_fits(dataclasses.replace(bounded.rat, loss="sampled_softmax"), data.num_items)
    check_objective_fits(dataclasses.replace(bounded.rat, ce_max_logits_gib=0.03), data.num_items)


def test_validation_on_a_sample_of_users_and_test_on_every_user(ml100k):
    cfg, data = ml100k
    rcfg = load_config(None, [f"root={cfg.root}"] + FAST + ["rat.epochs=1", "rat.eval.valid_users=100"]).rat
    result = fit(build_model(rcfg, "sasrec", "id", data.num_items), data, rcfg)
    assert all(result.valid[p]["overall"]["users"] == 100 for p in ("sampled", "full"))
    assert result.test["full"]["overall"]["users"] == data.num_users == len(result.test_ranks)
