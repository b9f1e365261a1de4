"""The adapt stage: RAT's own items reproduced bit for bit, new and changed items placed, incremental runs,
and every bad input refused with nothing published."""
import numpy as np
import pyarrow as pa
import pytest

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.embeddings import embeddings_table, vectors_of
from llmemb_dist.layout import adapted_uri, dataset_uri, embeddings_uri, rat_result_uri
from llmemb_dist.srs.placement import ItemPlacement
from llmemb_dist.stages.adapt.driver import adapt
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.driver import rat
from llmemb_dist.stages.rat.inputs import load_sequences

from conftest import start_local_ray

DIM = 8
SETTINGS = ["dataset.max_items=60", "rat.max_len=20", "rat.hidden=16", "rat.adapter_hidden=24", "rat.epochs=2",
            "rat.patience=2", f"rat.embedding_dim={DIM}", "rat.item_repr=llm_id", "rat.embeddings=v1",
            "rat.eval.num_negatives=20", "rat.loss=ce"]


def publish_embeddings(cfg, version, ids, hashes, vectors, encoder="enc-a", base="base-a"):
    uri = embeddings_uri(cfg, version)
    with storage.publish(uri, kind="embeddings", config={}, config_hash="test") as pub:
        pub.write_table("embeddings", embeddings_table(pa.array(ids, pa.string()), pa.array(hashes, pa.string()),
                                                       np.asarray(vectors, dtype=np.float32)), num_shards=3)
        pub.info.update(dim=np.asarray(vectors).shape[1], encoder=encoder, base_model={"path": base, "fingerprint": base})
    return uri


def by_id(table: pa.Table) -> dict[str, np.ndarray]:
    return dict(zip(table.column("item_id").to_pylist(), vectors_of(table)))


def train_on_random_embeddings(root, settings: list[str]):
    """RAT trained on ml-100k items with a fixed random LLM table (DIM wide) as embeddings version v1."""
    start_local_ray()
    cfg = load_config(None, [f"root={root}", *settings])
    prepare(cfg)
    catalog = storage.read_table(dataset_uri(cfg), "catalog")
    ids, hashes = catalog.column("item_id").to_pylist(), catalog.column("text_hash").to_pylist()
    vectors = np.random.default_rng(0).normal(size=(len(ids), DIM))
    publish_embeddings(cfg, "v1", ids, hashes, vectors)
    rat(cfg)
    return cfg, ids, hashes, vectors


@pytest.fixture(scope="module")
def trained(tmp_path_factory, s3_server):
    """RAT trained (llm_id, 2 epochs) on 60 ml-100k items with a fixed random LLM table as embeddings version v1."""
    return train_on_random_embeddings(tmp_path_factory.mktemp("runs"), SETTINGS)


@pytest.mark.slow
def test_adapt_on_rats_own_embeddings_reproduces_its_item_table_bit_for_bit(trained):
    cfg, ids, _, _ = trained
    cfg = load_config(None, [f"root={cfg.root}", *SETTINGS, "adapt.version=same", "adapt.embeddings=v1"])
    uri = adapt(cfg)
    adapted = storage.read_table(uri, "item_embeddings")
    published = storage.read_table(rat_result_uri(cfg), "item_embeddings")
    assert sorted(adapted.column("item_id").to_pylist()) == sorted(ids)
    mine, rats = by_id(adapted), by_id(published)
    assert all(np.array_equal(mine[item], rats[item]) for item in rats)  # bitwise, every trained item
    manifest = storage.read_manifest(uri)
    assert manifest["inputs"]["rat"]["uri"] == rat_result_uri(cfg) and manifest["inputs"]["embeddings"]["uri"].endswith("v1")


@pytest.mark.slow
def test_new_and_changed_items_are_placed_and_an_incremental_run_computes_only_them(trained):
    cfg, ids, hashes, vectors = trained
    rng = np.random.default_rng(1)
    new_ids = [f"new-{i}" for i in range(5)]
    changed = {ids[3], ids[10], ids[20]}
    hashes2 = [h + "-edited" if item in changed else h for item, h in zip(ids, hashes)]
    vectors2 = np.array([rng.normal(size=DIM) if item in changed else v for item, v in zip(ids, vectors)])
    new_vectors = rng.normal(size=(5, DIM))
    publish_embeddings(cfg, "v2", ids + new_ids, hashes2 + ["h-new"] * 5, np.vstack([vectors2, new_vectors]))

    base = [f"root={cfg.root}", *SETTINGS]
    first = adapt(load_config(None, base + ["adapt.version=day1", "adapt.embeddings=v1"]))
    day2_cfg = load_config(None, base + ["adapt.version=day2", "adapt.embeddings=v2", "adapt.incremental_from=day1"])
    uri = adapt(day2_cfg)
    manifest = storage.read_manifest(uri)
    assert manifest["counts"] == {"items": 65, "computed": 8, "reused": 57, "removed": 0}  # 5 new + 3 changed
    day1, day2 = by_id(storage.read_table(first, "item_embeddings")), by_id(storage.read_table(uri, "item_embeddings"))
    assert sorted(day2) == sorted(ids + new_ids)  # every item exactly once
    assert all(np.array_equal(day2[item], day1[item]) for item in ids if item not in changed)  # nothing else moved

    # What the representation gives them: new items their adapted LLM vector (ID side at zero), changed
    # items their new adapted LLM vector plus the ID vector they trained.
    rat_data = storage.data_uri(rat_result_uri(day2_cfg))
    placement = ItemPlacement.load(storage.download_dir(storage.join(rat_data, "placement"), cfg.root + "/placement-copy"))
    for item, raw in zip(new_ids, new_vectors):
        assert np.allclose(day2[item], placement.vectors([item], ["h-new"], raw[None])[0], atol=1e-6)
        assert not np.allclose(day2[item], 0)
    for item in changed:
        k = ids.index(item)
        assert np.allclose(day2[item], placement.vectors([item], [hashes2[k]], vectors2[k][None])[0], atol=1e-6)
        assert not np.allclose(day2[item], day1[item])

    assert adapt(day2_cfg) == uri and storage.read_manifest(uri) == manifest  # nothing changed: nothing to do
    # The next day with the same embeddings: nothing to compute, and day 2's files are linked, not rewritten.
    day3 = adapt(load_config(None, base + ["adapt.version=day3", "adapt.embeddings=v2", "adapt.incremental_from=day2"]))
    day3_manifest = storage.read_manifest(day3)
    assert day3_manifest["counts"] == {"items": 65, "computed": 0, "reused": 65, "removed": 0}
    assert day3_manifest["carried_files"] == {"copied": len(manifest["tables"]["item_embeddings"]["files"]), "rewritten": 0}
    assert by_id(storage.read_table(day3, "item_embeddings")).keys() == day2.keys()


def test_bad_inputs_are_refused_and_publish_nothing(trained, tmp_path):
    cfg, ids, hashes, vectors = trained
    base = [f"root={cfg.root}", *SETTINGS]
    publish_embeddings(cfg, "narrow", ids, hashes, vectors[:, :4])
    publish_embeddings(cfg, "other-model", ids, hashes, vectors, encoder="enc-b", base="base-b")
    publish_embeddings(cfg, "empty", [], [], np.zeros((0, DIM)))
    cases = [("narrow", r"dimension 4, but RAT .* trained on dimension 8"),
             ("other-model", r"base model 'base-b' .* RAT .* trained on embeddings by 'base-a'"),
             ("empty", "the embeddings version is empty")]
    for version, message in cases:
        bad = load_config(None, base + [f"adapt.version=bad-{version}", f"adapt.embeddings={version}"])
        with pytest.raises(storage.DataError, match=message):
            adapt(bad)
        assert not storage.is_published(adapted_uri(bad))

    # A RAT publication that predates the saved transform.
    old = load_config(None, base + ["rat.run=old", "adapt.version=bad-old", "adapt.embeddings=v1"])
    with storage.publish(rat_result_uri(old), kind="rat", config={}, config_hash="x") as pub:
        pub.write_text("model/model_config.json", "{}")
    with pytest.raises(storage.DataError, match="no saved transform"):
        adapt(old)
    assert not storage.is_published(adapted_uri(old))


def test_rat_trains_on_the_active_items_only(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}"])
    catalog = pa.table({"item_id": ["a", "b", "c", "d", "e"], "title": list("ABCDE"), "text_hash": list("12345")})
    events = pa.table({"user_id": ["u"] * 3 + ["v"] * 3, "item_id": ["d", "b", "d", "b", "d", "e"],
                       "timestamp": pa.array([1, 2, 3, 1, 2, 3], pa.int64())})
    with storage.publish(dataset_uri(cfg), kind="dataset", config={}, config_hash="x") as pub:
        pub.write_table("catalog", catalog)
        pub.write_table("interactions", events)
    data = load_sequences(cfg)
    assert data.item_ids == ["b", "d", "e"]  # catalog order; a and c are left to the adapt stage
    assert [s.tolist() for s in data.events] == [[2, 1, 2], [1, 2, 3]]
