"""Using what the pipeline publishes: the stable paths with peft, pandas and DuckDB, and the Python API
(read_embeddings, ItemEncoder, Recommender), on one real small pipeline run plus adapt; and the README's
example as written."""
import json
import re
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from llmemb_dist import storage
from llmemb_dist.api import ItemEncoder, Recommender, read_embeddings
from llmemb_dist.config import load_config
from llmemb_dist.data.catalog import ITEM_ID, attribute_columns
from llmemb_dist.data.embeddings import vectors_of
from llmemb_dist.layout import adapted_uri, adapter_uri, dataset_uri, embeddings_uri, rat_input_embeddings_uri, rat_result_uri
from llmemb_dist.llm.loading import portable_name
from llmemb_dist.stages.adapt.driver import adapt
from llmemb_dist.stages.pipeline import pipeline

from conftest import REPO, start_local_ray


@pytest.fixture(scope="module")
def published(tmp_path_factory, s3_server):
    """The embedded default (MiniLM) on its 200 most popular items with short training, then adapt."""
    start_local_ray()
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"root={root}", "model.max_length=32", "dataset.max_items=200",
        "scft.steps=4", "scft.batch_size=8", "scft.checkpoint_every=4", "embed.batch_size=32", "rat.epochs=2",
        "rat.patience=2", "rat.hidden=32", "rat.max_len=50", "adapt.version=today", f"tracking.mlflow_uri={root}/mlruns",
        "rat.text_weights=[4]",  # the text channel always on, so that serving must reproduce it
    ])
    pipeline(cfg)
    adapt(cfg)
    return cfg


def catalog_rows(cfg, n):
    catalog = storage.read_table(dataset_uri(cfg), "catalog")
    return catalog.slice(0, n).select([ITEM_ID, *attribute_columns(catalog.schema)]).to_pylist()


@pytest.mark.slow
def test_outputs_load_with_peft_pandas_and_duckdb_at_their_stable_paths(published, minilm_dir):
    from peft import PeftModel
    from transformers import AutoModel

    cfg = published
    adapter = f"{adapter_uri(cfg)}/adapter"
    assert json.loads(open(f"{adapter}/adapter_config.json").read())["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_dir), adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())

    items = storage.read_manifest(dataset_uri(cfg))["tables"]["catalog"]["rows"]
    frame = pd.read_parquet(f"{embeddings_uri(cfg)}/embeddings")
    assert list(frame.columns) == ["item_id", "text_hash", "embedding"] and len(frame) == items
    rows, dim = duckdb.sql(f"SELECT count(*), max(len(embedding)) FROM read_parquet("
                           f"'{rat_result_uri(cfg)}/item_embeddings/*.parquet')").fetchall()[0]
    assert rows == storage.read_manifest(rat_result_uri(cfg))["tables"]["item_embeddings"]["rows"] and dim == 32
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{adapted_uri(cfg)}/item_embeddings/*.parquet')"
                      ).fetchall() == [(items,)]


def test_an_adapter_names_its_base_model_portably():
    assert portable_name(load_config(None, ["model.path=minilm"]).model) == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name(load_config(None, ["model.path=s3://models/llama"]).model) == "s3://models/llama"


@pytest.mark.slow
def test_read_embeddings_and_item_encoder_reproduce_the_embedding_job(published):
    cfg = published
    table = read_embeddings(embeddings_uri(cfg))
    job = dict(zip(table.column(ITEM_ID).to_pylist(), vectors_of(table)))
    rows = catalog_rows(cfg, 3)
    encoder = ItemEncoder.from_publication(embeddings_uri(cfg))
    vectors = encoder.encode([{k: v for k, v in row.items() if k != ITEM_ID} for row in rows])
    assert vectors.shape == (3, len(job[rows[0][ITEM_ID]]))
    # The same prompt, adapter and pooling; only the batch's padding differs from the job's batches.
    assert np.allclose(vectors, [job[row[ITEM_ID]] for row in rows], atol=1e-5)

    with pytest.raises(ValueError, match="unknown attribute 'colour'"):
        encoder.encode([{"colour": "red"}])
    with pytest.raises(storage.DataError, match="needs an embeddings publication"):
        ItemEncoder.from_publication(rat_result_uri(cfg))
    with pytest.raises(storage.DataError, match="holds no item vectors"):
        read_embeddings(dataset_uri(cfg))


@pytest.mark.slow
def test_item_encoder_refuses_a_version_whose_adapter_was_republished(published, tmp_path):
    """A copy of the embeddings version and of its SCFT adapter; republishing the adapter (the same files in a
    new transaction folder, as an SCFT rerun with overwrite does) must stop the encoder, which would then make
    other vectors than the version holds."""
    cfg = published
    embeddings, adapter = tmp_path / "embeddings", tmp_path / "adapter"
    shutil.copytree(embeddings_uri(cfg), embeddings, symlinks=True)
    shutil.copytree(adapter_uri(cfg), adapter, symlinks=True)
    manifest = json.loads((embeddings / storage.MANIFEST).read_text())
    manifest["adapter"]["uri"] = str(adapter)
    (embeddings / storage.MANIFEST).write_text(json.dumps(manifest))
    ItemEncoder.from_publication(str(embeddings))  # the copy is the same adapter: accepted

    adapter_manifest = json.loads((adapter / storage.MANIFEST).read_text())
    (adapter / adapter_manifest["data_dir"]).rename(adapter / "data-republished")
    adapter_manifest["data_dir"] = "data-republished"
    (adapter / storage.MANIFEST).write_text(json.dumps(adapter_manifest))
    with pytest.raises(storage.DataError, match="has changed since it was embedded"):
        ItemEncoder.from_publication(str(embeddings))


@pytest.mark.slow
def test_recommender_ranks_every_item_of_an_adapted_version(published):
    cfg = published
    trained = Recommender.from_publication(rat_result_uri(cfg))
    everything = Recommender.from_publication(rat_result_uri(cfg), items=adapted_uri(cfg))
    assert set(trained.item_ids) <= set(everything.item_ids)
    history = [row[ITEM_ID] for row in catalog_rows(cfg, 5) if row[ITEM_ID] in trained.row][:3]
    # adapt gives trained items RAT's own vectors, so both score them alike.
    column = [everything.row[item] - 1 for item in trained.item_ids]
    assert np.allclose(trained.scores(history), everything.scores(history)[column], atol=1e-5)
    top = everything.top_k(history, k=10)
    assert len(top) == 10 and not {item for item, _ in top} & set(history)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    with pytest.raises(ValueError, match="not in this recommender's item table"):
        trained.scores(["no-such-item"])
    # The text channel: the backbone's score plus 4 x the cosine of each item's LLM vector to the last item's.
    llm = read_embeddings(rat_input_embeddings_uri(cfg))
    row = {item: k for k, item in enumerate(llm.column(ITEM_ID).to_pylist())}
    text = vectors_of(llm)[[row[item] for item in trained.item_ids]]
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    rows = torch.tensor([[trained.row[item] for item in history]])
    backbone = (trained.model.user_repr(rows) @ trained.table[1:].T)[0].detach().numpy()
    assert trained.model.text_weight == 4
    assert np.allclose(trained.scores(history), backbone + 4 * text @ text[trained.row[history[-1]] - 1], atol=1e-4)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(published, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Using the outputs", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "runs").symlink_to(published.root)  # the README's paths are the embedded default's ./runs
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["vectors"].shape == (3, 384) and len(scope["llm"]) == 200
    assert len(scope["rec"].top_k(["50", "172", "181"], k=10)) == 10
    assert {(name, "FINISHED") for name in ("prepare-ml-100k", "scft-default", "embed-default", "rat-default",
                                             "adapt-today")} <= {(r.info.run_name, r.info.status) for r in scope["runs"]}
