"""The embedding stage on real local Ray, the moto S3 server, a tiny random Llama and MiniLM."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmemb_dist import storage
from llmemb_dist.config import Config, ConfigError, load_config, to_dict
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH, attribute_columns, catalog_table, item_attributes, render_prompt
from llmemb_dist.layout import dataset_uri, embeddings_uri
from llmemb_dist.stages.embed.driver import embed
from llmemb_dist.data.embeddings import vectors_of
from llmemb_dist.llm.loading import (
    PooledEncoder, attach_lora, base_model_info, load_adapter, load_backbone, load_tokenizer, resolve_model, tokenize,
)
from llmemb_dist.stages.prepare.driver import prepare

MAX_ITEMS = 40


def make_cfg(root: str, model_dir: Path | str, *overrides: str) -> Config:
    return load_config(None, [
        f"root={root}", f"model.path={model_dir}", f"dataset.max_items={MAX_ITEMS}", "dataset.num_shards=2",
        "model.max_length=48", "embed.batch_size=4", "embed.num_actors=2", "embed.rows_per_file=16",
        "embed.adapter=none", *overrides,
    ])


def publish_adapter(cfg: Config, tmp_path: Path) -> str:
    """An SCFT-style adapter publication with non-zero LoRA weights (a fresh LoRA is a no-op)."""
    source = resolve_model(cfg.model)
    model = attach_lora(load_backbone(source, cfg.model), cfg.model.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    uri = storage.join(cfg.root, "scft", cfg.scft.run, "adapter")
    with storage.publish(uri, kind="adapter", config=to_dict(cfg.scft), config_hash="test-adapter") as pub:
        pub.upload_dir(out, "adapter")
        pub.info["base_model"] = base_model_info(source, cfg.model)
    return uri


def reference_vectors(cfg: Config, catalog: pa.Table, adapter_dir: Path | None = None) -> dict[str, np.ndarray]:
    """A single-process forward, one prompt at a time (no padding at all)."""
    source = resolve_model(cfg.model)
    backbone = load_backbone(source, cfg.model)
    if adapter_dir:
        backbone = load_adapter(backbone, adapter_dir)
    encoder, tok = PooledEncoder(backbone, cfg.model.pooling).eval(), load_tokenizer(source)
    columns = attribute_columns(catalog.schema)
    out = {}
    with torch.inference_mode():
        for row in catalog.to_pylist():
            prompt = render_prompt(cfg.model.instruction, item_attributes(row, columns))
            out[row[ITEM_ID]] = encoder(**tokenize(tok, [prompt], cfg.model.max_length))[0].numpy()
    return out


def assert_matches(uri: str, expected: dict[str, np.ndarray], catalog: pa.Table) -> None:
    table = storage.read_table(uri, "embeddings")
    ids = table[ITEM_ID].to_pylist()
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)  # every item exactly once
    assert dict(zip(ids, table[TEXT_HASH].to_pylist())) == dict(zip(catalog[ITEM_ID].to_pylist(), catalog[TEXT_HASH].to_pylist()))
    got = vectors_of(table)
    np.testing.assert_allclose(got, np.stack([expected[i] for i in ids]), rtol=1e-4, atol=1e-5)


def publish_catalog(cfg: Config, df: pd.DataFrame) -> str:
    uri = dataset_uri(cfg)
    with storage.publish(uri, kind="dataset", config=to_dict(cfg.dataset), config_hash=cfg.dataset.name) as pub:
        pub.write_table("catalog", catalog_table(df), 2)
    return uri


@pytest.mark.slow
def test_llama_with_adapter_on_s3_equals_single_process_despite_actor_death(ray_local, s3_root, tiny_llama_dir, tmp_path):
    cfg = make_cfg(s3_root, tiny_llama_dir, "embed.adapter=auto", "embed.fail_actor_once=true")
    prepare(cfg)
    adapter_uri = publish_adapter(cfg, tmp_path)
    uri = embed(cfg)

    m = storage.read_manifest(uri)
    assert Path(tempfile.gettempdir(), f"llmemb-embed-fault-{m['data_dir']}").exists()  # an actor did die
    assert m["counts"] == {"items": MAX_ITEMS, "new": MAX_ITEMS, "reused": 0, "removed": 0}
    assert m["dim"] == 64 and m["pca"] is None
    assert m["adapter"]["uri"] == adapter_uri
    assert m["base_model"]["fingerprint"] == base_model_info(resolve_model(cfg.model), cfg.model)["fingerprint"]
    assert m["catalog"]["uri"] == dataset_uri(cfg)
    catalog = storage.read_table(dataset_uri(cfg), "catalog")
    assert_matches(uri, reference_vectors(cfg, catalog, tmp_path / "adapter"), catalog)


def changed_catalog(catalog: pa.Table) -> pd.DataFrame:
    """Three items removed, two edited, two added."""
    df = catalog.drop([TEXT_HASH]).to_pandas()
    title = attribute_columns(df.columns)[0]
    df = df.iloc[3:].reset_index(drop=True)
    df.loc[0, title] = "An edited title"
    df.loc[1, title] = "Another edited title"
    added = df.iloc[:2].copy()
    added[ITEM_ID] = ["new-1", "new-2"]
    added[title] = ["A brand new item", "Another new item"]
    return pd.concat([df, added], ignore_index=True)


@pytest.mark.slow
def test_incremental_equals_full_and_unchanged_rerun_does_no_model_work(ray_local, minilm_dir, tmp_path, caplog):
    root = str(tmp_path / "runs")
    cfg = make_cfg(root, "minilm", "embed.version=v1")
    prepare(cfg)
    embed(cfg)

    changed = make_cfg(root, "minilm", "dataset.name=changed", "embed.version=v2", "embed.incremental_from=v1")
    publish_catalog(changed, changed_catalog(storage.read_table(dataset_uri(cfg), "catalog")))
    uri = embed(changed)
    manifest = storage.read_manifest(uri)
    assert manifest["counts"] == {"items": MAX_ITEMS - 1, "new": 4, "reused": MAX_ITEMS - 5, "removed": 3}
    catalog = storage.read_table(dataset_uri(changed), "catalog")
    assert_matches(uri, reference_vectors(changed, catalog), catalog)
    # v1's files that hold no removed or edited item are copied as they are; the others' current rows rewritten.
    current = set(zip(catalog[ITEM_ID].to_pylist(), catalog[TEXT_HASH].to_pylist()))
    v1_files = storage.table_files(embeddings_uri(cfg, "v1"), "embeddings")
    whole = {f.rsplit("/", 1)[-1] for f in v1_files
             if set(zip(*(storage.read_parquet_files([f])[c].to_pylist() for c in (ITEM_ID, TEXT_HASH)))) <= current}
    assert set(manifest["tables"]["embeddings"]["files"]) & {f.rsplit("/", 1)[-1] for f in v1_files} == whole
    assert manifest["carried_files"] == {"copied": len(whole), "rewritten": len(v1_files) - len(whole)}

    caplog.set_level(logging.INFO, logger="llmemb_dist.stages.embed")
    again = make_cfg(root, "minilm", "dataset.name=changed", "embed.version=v3", "embed.incremental_from=v2")
    again_uri = embed(again)
    again_manifest = storage.read_manifest(again_uri)
    assert again_manifest["counts"] == {"items": MAX_ITEMS - 1, "new": 0, "reused": MAX_ITEMS - 1, "removed": 0}
    assert "no model work" in caplog.text
    # Nothing changed: every file of v2 is v3's too, linked on this disk, not rewritten.
    v2_files, v3_files = (storage.table_files(u, "embeddings") for u in (uri, again_uri))
    assert again_manifest["carried_files"] == {"copied": len(v2_files), "rewritten": 0}
    assert all(os.path.samefile(a, b) for a, b in zip(sorted(v2_files), sorted(v3_files)))
    assert_matches(again_uri, reference_vectors(changed, catalog), catalog)


@pytest.mark.slow
def test_pca_is_fitted_stored_and_reused_incrementally(ray_local, minilm_dir, tmp_path):
    root = str(tmp_path / "runs")
    cfg = make_cfg(root, "minilm", "embed.version=p1", "embed.pca_dim=8")
    prepare(cfg)
    full = storage.read_table(embed(cfg), "embeddings")
    x = vectors_of(full)
    assert x.shape == (MAX_ITEMS, 8)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)  # centred
    var = x.var(0)
    assert np.all(var[:-1] >= var[1:] - 1e-6)  # components ordered by explained variance

    again = make_cfg(root, "minilm", "embed.version=p2", "embed.pca_dim=8", "embed.incremental_from=p1")
    uri = embed(again)
    assert storage.read_manifest(uri)["counts"]["new"] == 0
    same = storage.read_table(uri, "embeddings")
    order = {i: k for k, i in enumerate(same[ITEM_ID].to_pylist())}
    np.testing.assert_array_equal(vectors_of(same)[[order[i] for i in full[ITEM_ID].to_pylist()]], x)


def test_pca_reduced_in_the_cluster_equals_an_exact_svd(ray_local, tmp_path):
    """Moments of 23 files (more than one round of the tree of tasks) add up to the PCA of the whole table."""
    from llmemb_dist.data.embeddings import embeddings_table
    from llmemb_dist.stages.embed.dataflow import REDUCE_FAN_IN, fit_pca, moments_in_tree
    from llmemb_dist.stages.embed.pca import block_moments

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(460, 12)) * np.linspace(3, 0.5, 12) + 2.0).astype(np.float32)
    files = []
    for k, rows in enumerate(np.array_split(np.arange(len(x)), 23)):
        name = f"part-{k:03d}.parquet"
        pq.write_table(embeddings_table(pa.array([f"i{r}" for r in rows]), pa.array(["h"] * len(rows)), x[rows]),
                       tmp_path / name)
        files.append({"file": name})
    pca = fit_pca(str(tmp_path), files, 4)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca["mean"], x.mean(0), atol=1e-5)
    for got, want in zip(pca["components"], vt[:4]):  # each direction up to its sign
        np.testing.assert_allclose(got * np.sign(got @ want), want, atol=1e-4)
    # The tree: 23 blocks' moments, two rounds of tasks, the same sums as one pass over all rows.
    blocks = [block_moments(embeddings_table(pa.array(["i"] * len(r)), pa.array(["h"] * len(r)), x[r]))
              for r in np.array_split(np.arange(len(x)), 23)]
    assert len(blocks) > REDUCE_FAN_IN
    (tree,) = moments_in_tree([ray_local.put(b) for b in blocks]).to_pylist()
    (whole,) = block_moments(embeddings_table(pa.array(["i"] * len(x)), pa.array(["h"] * len(x)), x)).to_pylist()
    assert tree["n"] == whole["n"] == len(x)
    np.testing.assert_allclose(np.frombuffer(tree["gram"]), np.frombuffer(whole["gram"]), rtol=1e-9)
    np.testing.assert_allclose(np.frombuffer(tree["sum"]), np.frombuffer(whole["sum"]), rtol=1e-9)


# ---------------------------------------------------------------- bad input: a clear error, nothing published


def test_adapter_for_another_base_model_is_refused(ray_local, tiny_llama_dir, tmp_path):
    root = str(tmp_path / "runs")
    publish_adapter(make_cfg(root, tiny_llama_dir), tmp_path)
    cfg = make_cfg(root, "minilm", "embed.adapter=auto")
    prepare(cfg)
    with pytest.raises(ConfigError, match="trained on base model"):
        embed(cfg)
    assert not storage.is_published(embeddings_uri(cfg))


def test_an_actor_pool_that_takes_every_cpu_is_refused_before_it_hangs(ray_local, tmp_path):
    cfg = make_cfg(str(tmp_path / "runs"), "minilm", "embed.num_actors=4", "embed.cpus_per_actor=1")  # 4 CPUs
    publish_catalog(cfg, pd.DataFrame({ITEM_ID: ["a", "b"], "title": ["A film", "Another"]}))
    with pytest.raises(ConfigError, match="leaves no whole CPU for Ray Data's reads and writes"):
        embed(cfg)
    assert not storage.is_published(embeddings_uri(cfg))


def test_item_with_every_attribute_empty_is_refused(ray_local, tmp_path):
    cfg = make_cfg(str(tmp_path / "runs"), "minilm")
    publish_catalog(cfg, pd.DataFrame({ITEM_ID: ["a", "b"], "title": ["A film", None], "genre": ["drama", "  "]}))
    with pytest.raises(storage.DataError, match="item 'b' has every attribute empty"):
        embed(cfg)
    assert not storage.is_published(embeddings_uri(cfg))


def test_empty_catalog_is_refused(ray_local, tmp_path):
    cfg = make_cfg(str(tmp_path / "runs"), "minilm")
    publish_catalog(cfg, pd.DataFrame({ITEM_ID: pd.Series([], dtype=str), "title": pd.Series([], dtype=str)}))
    with pytest.raises(storage.DataError, match="catalog is empty"):
        embed(cfg)
    assert not storage.is_published(embeddings_uri(cfg))


def test_incremental_with_another_dimension_is_refused(ray_local, tmp_path):
    root = str(tmp_path / "runs")
    cfg = make_cfg(root, "minilm", "embed.version=v2", "embed.incremental_from=v1")
    prepare(cfg)
    previous = embeddings_uri(cfg, "v1")
    with storage.publish(previous, kind="embeddings", config={}, config_hash="old") as pub:
        pub.write_table("embeddings", pa.table({ITEM_ID: ["1"], TEXT_HASH: ["h"], "embedding": pa.array([[0.0] * 16], pa.list_(pa.float32(), 16))}))
        pub.info["dim"] = 16
    before = storage.read_manifest(previous)
    with pytest.raises(storage.DataError, match="dimension 16, this run gives 384"):
        embed(cfg)
    assert not storage.is_published(embeddings_uri(cfg))
    assert storage.read_manifest(previous) == before  # the previous version is untouched


@pytest.mark.slow
def test_incremental_after_a_new_encoder_embeds_every_item(ray_local, tmp_path, caplog):
    """A scheduled re-embedding right after a new SCFT adapter must not fail: nothing is reusable."""
    root = str(tmp_path / "runs")
    cfg = make_cfg(root, "minilm", "embed.version=v2", "embed.incremental_from=v1", "embed.num_actors=1")
    prepare(cfg)
    with storage.publish(embeddings_uri(cfg, "v1"), kind="embeddings", config={}, config_hash="old") as pub:
        pub.write_table("embeddings", pa.table({ITEM_ID: ["1"], TEXT_HASH: ["h"], "embedding": pa.array([[0.0] * 384], pa.list_(pa.float32(), 384))}))
        pub.info.update(dim=384, encoder="an-older-adapter")
    caplog.set_level(logging.WARNING, logger="llmemb_dist.stages.embed")
    uri = embed(cfg)
    assert "no vector can be reused" in caplog.text
    assert storage.read_manifest(uri)["counts"] == {"items": MAX_ITEMS, "new": MAX_ITEMS, "reused": 0, "removed": 0}


def test_keys_and_carry_over_are_computed_by_ray_tasks_from_files(ray_local, tmp_path):
    """The driver gets counts and checksums; which previous files are copied whole, rewritten in part or
    dropped follows from the rows both versions hold."""
    import ray

    from llmemb_dist.blockio import carry_over, key_checksum, read_not_carried, row_hashes, table_keys, write_with_carry_over

    def files(name, rows):
        table = pa.table({ITEM_ID: [r[0] for r in rows], TEXT_HASH: [r[1] for r in rows]})
        (tmp_path / name).mkdir()
        uris = [str(tmp_path / name / f"part-{k}.parquet") for k in range(2)]
        pq.write_table(table.slice(0, 3), uris[0])
        pq.write_table(table.slice(3), uris[1])
        return table, uris

    current, current_files = files("now", [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5"), ("z", "0")])
    keys = table_keys(current_files, blank_hash="0", lookups=True)
    assert (keys.rows, keys.checksum, keys.blank) == (6, key_checksum(current[ITEM_ID], current[TEXT_HASH]), "z")
    assert (ray.get(keys.row_hashes) == np.sort(row_hashes(current[ITEM_ID], current[TEXT_HASH]))).all()
    assert table_keys(current_files).row_hashes is None  # a full run looks nothing up
    # day 1: a, b, c as today (first file copied whole); d edited since, x removed, e as today (rewritten in part)
    _, previous_files = files("before", [("a", "1"), ("b", "2"), ("c", "3"), ("d", "9"), ("x", "7"), ("e", "5")])
    carry = carry_over(keys, previous_files)
    assert (carry.reused, carry.removed) == (4, 1)
    assert [c["uri"] for c in carry.whole] == previous_files[:1] and [p["uri"] for p in carry.partial] == previous_files[1:]
    # The partly current file is rewritten with its current rows, from the planning task's mask (no row hashed
    # again); the catalog rows to compute are the ones the previous version lacks.
    out = tmp_path / "out"
    written = write_with_carry_over(None, carry, str(out), rows_per_file=10)
    assert sum(m["rows"] for m in written) == 4
    rewritten = pq.read_table(out / next(m["file"] for m in written if m["file"] != "part-0.parquet"))
    assert rewritten[ITEM_ID].to_pylist() == ["e"]
    assert int(next(m["checksum"] for m in written if m["file"] != "part-0.parquet")) == key_checksum(rewritten[ITEM_ID], rewritten[TEXT_HASH])
    to_compute = read_not_carried(current_files, carry).to_arrow_refs()
    assert sorted(pa.concat_tables(ray.get(to_compute))[ITEM_ID].to_pylist()) == ["d", "z"]
