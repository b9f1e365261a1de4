"""The index stage: an exact index answers top_k as the full scan does, HNSW and IVF find the true top 10,
the manifest records what the index is, a rerun reuses it, a new item placed by adapt is served for its
text neighbours, an IVF index updated for a carried-over version answers as one built over the same cells
and serves the new version's items, other kinds and too much change rebuild, the pipeline indexes only
when asked, and a mismatched index or bad config is refused."""
import dataclasses
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmemb_dist import storage
from llmemb_dist.api import Recommender
from llmemb_dist.cli import main
from llmemb_dist.config import ConfigError, load_config
from llmemb_dist.data.embeddings import vectors_of
from llmemb_dist.layout import adapted_uri, embeddings_uri, index_uri, rat_result_uri
from llmemb_dist.stages.adapt.driver import adapt
from llmemb_dist.stages.index import incremental, kinds, serving, users
from llmemb_dist.stages.index.driver import index
from llmemb_dist.stages.pipeline import pipeline, stages

from conftest import REPO, free_port
from test_adapt import publish_embeddings, train_on_random_embeddings

DIM, HIDDEN = 8, 16
SETTINGS = ["dataset.max_items=60", "rat.max_len=20", f"rat.hidden={HIDDEN}", "rat.adapter_hidden=24", "rat.epochs=2",
            "rat.patience=2", f"rat.embedding_dim={DIM}", "rat.item_repr=llm_id", "rat.embeddings=v1",
            "rat.eval.num_negatives=20", "rat.loss=ce", "adapt.version=today", "adapt.embeddings=v1",
            "rat.text_weights=[4]"]  # the text channel on, so that the index must hold its columns too


@pytest.fixture(scope="module")
def published(tmp_path_factory, s3_server):
    """RAT (llm_id, text channel on) on 60 ml-100k items over a random LLM table, adapted as version `today`."""
    cfg, *_ = train_on_random_embeddings(tmp_path_factory.mktemp("runs"), SETTINGS)
    adapt(cfg)
    return cfg


def config(cfg, *overrides):
    return load_config(None, [f"root={cfg.root}", *SETTINGS, *overrides])


def histories(cfg, rec, count=20):
    return users.validation_histories(rat_result_uri(cfg), storage.read_manifest(rat_result_uri(cfg)),
                                      set(rec.item_ids), count, seed=1)


def test_an_exact_index_answers_top_k_as_the_full_scan(published):
    cfg = config(published, "index.version=exact", "index.kind=exact")
    uri = index(cfg)
    full = Recommender.from_publication(rat_result_uri(cfg), items=adapted_uri(cfg))
    fast = Recommender.from_publication(rat_result_uri(cfg), index=uri)
    assert fast.index is not None and fast.item_ids == full.item_ids
    for history in histories(cfg, full):
        for k, exclude in ((10, True), (5, False)):
            mine, theirs = fast.top_k(history, k, exclude), full.top_k(history, k, exclude)
            assert [item for item, _ in mine] == [item for item, _ in theirs] and len(mine) == k
            assert np.allclose([s for _, s in mine], [s for _, s in theirs], rtol=0, atol=1e-5)
            assert not exclude or not {item for item, _ in mine} & set(history)
    # More than the catalog holds: every item not in the history, as the full scan gives.
    history = histories(cfg, full)[0]
    assert [i for i, _ in fast.top_k(history, 500)] == [i for i, _ in full.top_k(history, 500)]


def test_the_manifest_records_what_the_index_is_and_a_rerun_reuses_it(published):
    cfg = config(published, "index.version=hnsw", "index.kind=hnsw", "index.m=8", "index.recall_users=50")
    uri = index(cfg)
    manifest = storage.read_manifest(uri)
    adapted, rat_result = storage.read_manifest(adapted_uri(cfg)), storage.read_manifest(rat_result_uri(cfg))
    assert manifest["kind"] == "index"
    assert manifest["inputs"] == {"adapted": {"uri": adapted_uri(cfg), "data_dir": adapted["data_dir"]},
                                  "rat": {"uri": rat_result_uri(cfg), "data_dir": rat_result["data_dir"]}}
    assert manifest["index"] == {"kind": "hnsw", "m": 8, "ef_construction": 200, "ef_search": 128,
                                 "recall_users": 50, "recall_seed": 0}
    assert manifest["items"] == 60 and manifest["dim"] == HIDDEN + DIM and manifest["text_weight"] == 4
    assert manifest["recall_users"] == 50 and 0.9 <= manifest["recall_at_10"] <= 1 and manifest["build_seconds"] > 0
    assert manifest["build"] == {"mode": "full"} and manifest["quantizer"] is None
    assert set(manifest["tables"]) == {"item_ids"} and "faiss/index.faiss" in manifest["files"]
    assert storage.read_table(uri, "item_ids").column("item_id").to_pylist() == \
        Recommender.from_publication(rat_result_uri(cfg), items=adapted_uri(cfg)).item_ids

    assert index(cfg) == uri and storage.read_manifest(uri) == manifest  # the same inputs: nothing to do
    with pytest.raises(storage.AlreadyPublished, match="choose another index.version"):
        index(config(published, "index.version=hnsw", "index.kind=hnsw", "index.m=16"))


def test_an_index_of_another_adapted_version_or_rat_result_is_refused(published, tmp_path):
    cfg = config(published, "index.version=mismatch", "index.kind=exact")
    uri = index(cfg)
    other = adapt(config(published, "adapt.version=other"))  # the same vectors, another publication
    with pytest.raises(storage.DataError, match=r"built over the adapted version .*today.* not this recommender's .*other"):
        Recommender.from_publication(rat_result_uri(cfg), items=other, index=uri)

    # The RAT result republished (its files in a new transaction folder, as a rerun with overwrite leaves them).
    republished = tmp_path / "rat"
    shutil.copytree(rat_result_uri(cfg), republished, symlinks=True)
    manifest = json.loads((republished / storage.MANIFEST).read_text())
    (republished / manifest["data_dir"]).rename(republished / "data-republished")
    manifest["data_dir"] = "data-republished"
    (republished / storage.MANIFEST).write_text(json.dumps(manifest))
    Recommender.from_publication(str(republished), items=adapted_uri(cfg))  # a model in its own right
    with pytest.raises(storage.DataError, match=r"built over the RAT result .* not this recommender's"):
        Recommender.from_publication(str(republished), items=adapted_uri(cfg), index=uri)
    with pytest.raises(storage.DataError, match="not an index publication"):
        Recommender.from_publication(rat_result_uri(cfg), index=adapted_uri(cfg))

    # An adapted version whose RAT result was republished after it was adapted: its vectors are of a model
    # no longer published, so the stage refuses to index it, and publishes nothing.
    stale = config(published, "index.version=stale", "index.adapted=stale")
    shutil.copytree(adapted_uri(cfg), adapted_uri(stale, "stale"), symlinks=True)
    stale_manifest = json.loads(open(f"{adapted_uri(stale, 'stale')}/{storage.MANIFEST}").read())
    stale_manifest["inputs"]["rat"]["uri"] = str(republished)
    open(f"{adapted_uri(stale, 'stale')}/{storage.MANIFEST}", "w").write(json.dumps(stale_manifest))
    with pytest.raises(storage.DataError, match="has been republished since .*data-republished.*: adapt again"):
        index(stale)
    assert not storage.is_published(index_uri(stale))


def test_a_new_item_placed_by_adapt_is_served_for_a_history_of_its_text_neighbours(published):
    """Today's catalog holds an item RAT never trained on: adapt places it from its LLM vector alone, the
    index holds it, and what the endpoint answers with returns it for a history of the items whose text is
    closest to its own, and not for one of the items farthest from it."""
    trained = storage.read_table(embeddings_uri(published, "v1"), "embeddings")
    ids, hashes, vectors = trained.column("item_id").to_pylist(), trained.column("text_hash").to_pylist(), vectors_of(trained)
    rng = np.random.default_rng(7)
    new = vectors[5] + 0.3 * np.linalg.norm(vectors[5]) * rng.normal(size=DIM) / np.sqrt(DIM)  # text near item 5's
    publish_embeddings(published, "today-new", ids + ["new-item"], hashes + ["h-new"], np.vstack([vectors, new]))
    adapt(config(published, "adapt.version=today-new", "adapt.embeddings=today-new"))
    uri = index(config(published, "index.version=today-new", "index.adapted=today-new", "index.kind=hnsw", "index.m=8"))
    assert "new-item" not in storage.read_table(rat_result_uri(published), "item_embeddings").column("item_id").to_pylist()

    cosine = vectors @ new / np.linalg.norm(vectors, axis=1) / np.linalg.norm(new)
    nearest, farthest = [ids[k] for k in np.argsort(-cosine)[:3][::-1]], [ids[k] for k in np.argsort(cosine)[:3]]
    served = serving.load(uri).recommender  # what the Ray Serve app answers with, found from the index alone
    assert served.index is not None and "new-item" in served.item_ids
    top = served.top_k(nearest, 10)  # oldest first: the closest text last
    full = Recommender.from_publication(rat_result_uri(published), items=adapted_uri(published, "today-new"))
    assert "new-item" in [item for item, _ in top]
    assert [item for item, _ in top] == [item for item, _ in full.top_k(nearest, 10)]
    assert "new-item" not in [item for item, _ in served.top_k(farthest, 10)]


def test_hnsw_and_ivf_find_the_true_top_10_of_20000_random_vectors():
    rng = np.random.default_rng(0)
    items, queries = rng.normal(size=(20_000, 32)).astype(np.float32), rng.normal(size=(200, 32)).astype(np.float32)
    truth = kinds.exact_top(queries, items, 10)
    cfg = load_config(None, ["index.kind=hnsw", "index.m=16", "index.nlist=64", "index.nprobe=64"]).index
    hnsw = kinds.build(items, kinds.resolve(cfg, 20_000, "test"))
    assert kinds.recall(hnsw.search(queries, 10)[1], truth) >= 0.95
    # Isotropic random vectors have no cells to speak of, so IVF is checked where it must be exact: every
    # cell searched; fewer cells find less.
    ivf = kinds.build(items, kinds.resolve(dataclasses.replace(cfg, kind="ivf"), 20_000, "test"))
    assert kinds.recall(ivf.search(queries, 10)[1], truth) == 1
    ivf.nprobe = 4
    assert kinds.recall(ivf.search(queries, 10)[1], truth) < 0.9
    exact = kinds.build(items, {"kind": "exact"})
    assert kinds.recall(exact.search(queries, 10)[1], truth) == 1
    assert kinds.recall(truth[:, ::-1][:, :5].repeat(2, 1), truth) == 0.5  # half the true top 10, in any order


def test_an_updated_ivf_index_answers_as_its_cells_filled_anew_and_never_returns_a_removed_item():
    """The next catalog, in another order: 300 items gone, 400 with a new vector, 300 new. The previous index
    updated answers every query with the labels and scores of its trained cells emptied and filled with the
    new catalog, each item under the label the update gives it: an item keeps its label, a new one takes
    the next unused."""
    import faiss

    rng = np.random.default_rng(0)
    items, d = rng.normal(size=(20_000, 32)).astype(np.float32), 32
    ids = [f"i{k}" for k in range(len(items))]
    previous = kinds.build(items, {"kind": "ivf", "nlist": 64, "nprobe": 8, "seed": 0})
    gone, edited = np.split(rng.permutation(len(items))[:700], [300])
    vectors = items.copy()
    vectors[edited] = rng.normal(size=(len(edited), d))
    stay = np.setdiff1d(np.arange(len(items)), gone)
    new_ids = [ids[k] for k in stay] + [f"new{k}" for k in range(300)]
    new_vectors = np.vstack([vectors[stay], rng.normal(size=(300, d))]).astype(np.float32)
    order = rng.permutation(len(new_ids))
    new_ids, new_vectors = [new_ids[k] for k in order], new_vectors[order]

    change = incremental.changes(previous, np.arange(len(items)), ids, new_ids, new_vectors)
    assert (len(change.stale), len(change.rows), change.new) == (700, 700, 300)
    label = dict(zip(new_ids, change.labels.tolist()))
    assert all(label[ids[k]] == k for k in stay) and sorted(label[f"new{k}"] for k in range(300)) == \
        list(range(len(items), len(items) + 300))
    same_cells = faiss.clone_index(previous)
    same_cells.reset()
    same_cells.add_with_ids(new_vectors, change.labels)
    change.apply(previous, new_vectors)
    assert previous.ntotal == len(new_ids)
    queries = rng.normal(size=(200, d)).astype(np.float32)
    updated, filled = previous.search(queries, 10), same_cells.search(queries, 10)
    assert np.array_equal(updated[1], filled[1]) and np.array_equal(updated[0], filled[0])

    # A gone item's own vector, searched in every cell, finds it no more; each label holds its item's new vector.
    previous.nprobe = 64
    assert not set(previous.search(items[gone], 10)[1].ravel()) & set(gone.tolist())
    previous.set_direct_map_type(faiss.DirectMap.Hashtable)
    assert np.array_equal(previous.reconstruct_batch(change.labels), new_vectors)


@pytest.fixture(scope="module")
def day2(published):
    """The next day's catalog, adapted incrementally from `today`: 3 items gone, 3 with new text, 2 new."""
    trained = storage.read_table(embeddings_uri(published, "v1"), "embeddings")
    ids, hashes = trained.column("item_id").to_pylist(), trained.column("text_hash").to_pylist()
    vectors = vectors_of(trained)
    rng = np.random.default_rng(3)
    gone, edited = set(ids[:3]), set(ids[3:6])
    kept = [k for k, item in enumerate(ids) if item not in gone]
    publish_embeddings(published, "day2", [ids[k] for k in kept] + ["new-a", "new-b"],
                       [hashes[k] + ("-edited" if ids[k] in edited else "") for k in kept] + ["h-a", "h-b"],
                       np.vstack([[rng.normal(size=DIM) if ids[k] in edited else vectors[k] for k in kept],
                                  rng.normal(size=(2, DIM))]))
    adapt(config(published, "adapt.version=day2", "adapt.embeddings=day2", "adapt.incremental_from=today"))
    return sorted(gone), sorted(edited)


def labels_of(uri):
    table = storage.read_table(uri, "item_ids")
    return dict(zip(table.column("item_id").to_pylist(), table.column("label").to_pylist()))


IVF = ["index.kind=ivf", "index.nlist=4", "index.nprobe=4", "index.recall_users=50"]  # every cell searched: exact


def test_an_ivf_index_updated_for_a_carried_over_version_serves_the_new_versions_items(published, day2, tmp_path):
    """As the daily refresh does it: one served version, updated from itself for the next adapted version."""
    gone, edited = day2
    live = ["index.version=live", "index.incremental_from=live", "index.replace=true", *IVF]
    first = storage.read_manifest(index(config(published, *live)))
    assert first["build"] == {"mode": "full", "from": {"uri": index_uri(published, "live"), "data_dir": None},
                              "reason": "nothing is published there"}
    assert first["quantizer"] == {"trained_over": 60, "changed_since": 0}
    first_labels = labels_of(index_uri(published, "live"))

    uri = index(config(published, *live, "index.adapted=day2"))
    manifest = storage.read_manifest(uri)
    assert manifest["build"] == {"mode": "incremental", "removed": 6, "added": 5,
                                 "from": {"uri": uri, "data_dir": first["data_dir"]}}
    assert manifest["quantizer"] == {"trained_over": 60, "changed_since": 8} and manifest["items"] == 59
    assert manifest["inputs"]["adapted"]["uri"] == adapted_uri(published, "day2") and manifest["recall_at_10"] == 1
    # An item keeps its label; the new ones take the next.
    now = labels_of(uri)
    assert sorted([now.pop("new-a"), now.pop("new-b")]) == [60, 61]
    assert now == {item: label for item, label in first_labels.items() if item not in gone}

    served = serving.load(uri).recommender  # what the endpoint answers with
    full = Recommender.from_publication(rat_result_uri(published), items=adapted_uri(published, "day2"))
    assert served.item_ids == full.item_ids and not set(gone) & set(served.item_ids)
    answered = set()
    for history in histories(published, full):
        mine, theirs = served.top_k(history, 10), full.top_k(history, 10)
        assert [i for i, _ in mine] == [i for i, _ in theirs]
        assert np.allclose([s for _, s in mine], [s for _, s in theirs], rtol=0, atol=1e-5)
        answered |= {i for i, _ in served.top_k(history, 59, exclude_history=False)}
    assert answered == set(full.item_ids) and {"new-a", "new-b", *edited} <= answered

    # Labels that repeat are refused, naming the table and column, before anything is served.
    broken = tmp_path / "broken"
    shutil.copytree(uri, broken)
    ids_file = storage.table_files(str(broken), "item_ids")[0]
    table = storage.read_parquet_files([ids_file])
    os.remove(ids_file)  # a new file: the copy's may share its data with the original's
    pq.write_table(table.set_column(1, "label", pa.array(np.zeros(table.num_rows, np.int64))), ids_file)
    with pytest.raises(storage.DataError, match="table 'item_ids' column 'label' holds a negative or repeated label"):
        Recommender.from_publication(rat_result_uri(published), index=str(broken))


def test_another_kind_other_cells_or_too_much_change_build_the_index_in_full(published, day2):
    before = storage.read_manifest(index(config(published, "index.version=before", *IVF)))
    source = {"uri": index_uri(published, "before"), "data_dir": before["data_dir"]}
    for version, overrides, reason in (
            ("hnsw-next", ["index.kind=hnsw", "index.m=8"], "index.kind hnsw: only an IVF index removes and adds "
             "vectors in place"),
            ("cells-next", ["index.nlist=3", "index.nprobe=3"], "its cells are those of {'kind': 'ivf', 'nlist': 4, "
             "'seed': 0}, not of {'kind': 'ivf', 'nlist': 3, 'seed': 0}"),
            ("strict-next", ["index.incremental_max_change=0.1"], "8 items removed, added or changed since its cells "
             "were trained over 60, more than index.incremental_max_change 0.1 of them")):
        cfg = config(published, *IVF, f"index.version={version}", "index.adapted=day2", "index.incremental_from=before",
                     *overrides)
        manifest = storage.read_manifest(index(cfg))
        assert manifest["build"] == {"mode": "full", "from": source, "reason": reason}
        if overrides[0].startswith("index.kind=hnsw"):
            assert manifest["quantizer"] is None
        else:
            assert manifest["quantizer"] == {"trained_over": 59, "changed_since": 0}
        assert Recommender.from_publication(rat_result_uri(cfg), index=index_uri(cfg)).item_ids == \
            storage.read_table(adapted_uri(cfg, "day2"), "item_embeddings").column("item_id").to_pylist()


def test_bad_index_config_is_refused_by_key_name(published, capsys):
    for override, message in (("index.kind=flat", "'index.kind' must be one of"), ("index.m=1", "'index.m' must be at least 2"),
                              ("index.nprobe=5000", "index.nprobe 5000 must be at most index.nlist 4096"),
                              ("index.recall_users=0", "'index.recall_users' must be at least 1"),
                              ("index.adapted=../x", "'index.adapted' must be a name")):
        with pytest.raises(ConfigError, match=message):
            config(published, override)
    # More cells than items is known only from the adapted version: refused before any work, nothing published.
    argv = [f"root={published.root}", *SETTINGS, "index.version=too-many-cells", "index.kind=ivf", "index.nlist=100",
            "index.nprobe=8"]
    assert main("index", index, [str(REPO / "configs" / "default.yaml"), *argv]) == 2
    assert "index.nlist 100 is more than its 60 items" in capsys.readouterr().err
    assert not storage.is_published(index_uri(config(published, "index.version=too-many-cells")))


def test_the_pipeline_adapts_and_indexes_only_with_pipeline_index(tmp_path, capsys):
    def names(*overrides):
        return [name for name, _ in stages(load_config(None, list(overrides)))]

    assert names() == ["prepare", "scft", "embed", "rat"]
    assert names("pipeline.index=true") == ["prepare", "scft", "embed", "rat", "adapt", "index"]
    # A model with no text side cannot adapt the catalog: refused before any stage runs or Ray starts.
    assert main("pipeline", pipeline, [str(REPO / "configs" / "default.yaml"), f"root={tmp_path}",
                                       "pipeline.index=true", "rat.item_repr=id"]) == 2
    assert "pipeline.index=true needs rat.item_repr with a text side" in capsys.readouterr().err


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_ray_serve_answers_over_http_and_reloads_a_republished_index_without_dropping_requests(published):
    from ray import serve

    cfg = config(published, "index.version=served", "index.kind=exact", f"index.serve_port={free_port()}",
                 "index.serve_watch_s=0.5")
    first = storage.read_manifest(index(cfg))["data_dir"]
    rec = Recommender.from_publication(rat_result_uri(cfg), index=index_uri(cfg))
    history = histories(cfg, rec)[0]
    url = serving.start(cfg)
    try:
        status, answer = post(url, {"history": history, "k": 5})
        assert status == 200 and answer["index"] == first
        assert [(i["item_id"], pytest.approx(i["score"], abs=1e-5)) for i in answer["items"]] == rec.top_k(history, 5)
        assert post(url, {"history": ["no-such-item"]}) == (400, {"error": "item 'no-such-item' of the history is "
                                                                  "not in this recommender's item table"})
        assert post(url, {"history": history, "k": 0})[0] == 400

        answers, stop = [], threading.Event()

        def ask():  # requests one after another while the index is republished, at most 400
            while not stop.is_set() and len(answers) < 400:
                answers.append(post(url, {"history": history, "k": 5}))

        client = threading.Thread(target=ask)
        client.start()
        second = storage.read_manifest(index(config(published, "index.version=served", "index.kind=hnsw",
                                                    "index.replace=true")))["data_dir"]
        deadline = time.time() + 120
        while time.time() < deadline and not any(a[1].get("index") == second for a in answers[-3:]):
            time.sleep(0.2)
        time.sleep(1)  # a few requests on the new version too
        stop.set()
        client.join()
        assert second != first and answers and all(status == 200 for status, _ in answers)
        versions = [a["index"] for _, a in answers]
        switch = versions.index(second)  # served the new version, and never the old one after it
        assert set(versions[:switch]) <= {first} and set(versions[switch:]) == {second}
    finally:
        serve.delete(serving.APP)
