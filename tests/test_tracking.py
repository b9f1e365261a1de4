"""Experiment tracking: real stages log their config, metrics per epoch or step and final figures to MLflow
and to TensorBoard event files published beside their outputs; both are read back with their own readers."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llmemb_dist import storage, tracking
from llmemb_dist.config import config_hash, hashed, load_config
from llmemb_dist.data.embeddings import embeddings_table
from llmemb_dist.layout import adapter_uri, dataset_uri, embeddings_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.driver import rat
from llmemb_dist.stages.scft.driver import scft, stage_hash

RAT = ["dataset.max_items=60", "rat.max_len=20", "rat.hidden=16", "rat.adapter_hidden=24", "rat.epochs=3",
       "rat.patience=3", "rat.item_repr=llm_id", "rat.embeddings=v1", "rat.embedding_dim=8",
       "rat.eval.num_negatives=20", "rat.loss=ce"]


def mlflow_runs(uri: str) -> tuple:
    """MLflow's own client on the store, and the experiment's runs by name."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to open a file store
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("llmemb")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def history(client, run, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def published_events(uri: str) -> tuple[dict[str, list[int]], list[str]]:
    """The steps of every scalar and the text tags in a publication's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    manifest = storage.read_manifest(uri)
    assert any(f.startswith(f"{tracking.TENSORBOARD_DIR}/events.out.tfevents.") for f in manifest["files"])
    events = EventAccumulator(str(Path(storage.data_uri(uri, manifest)) / tracking.TENSORBOARD_DIR))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events.Tags()["tensors"]


def test_tracking_keys_are_in_no_stage_hash():
    on, off = load_config(None, []), load_config(None, ["tracking.enabled=false", "tracking.experiment=other"])
    assert stage_hash(on) == stage_hash(off)
    for section in ("dataset", "embed", "rat", "adapt"):
        assert config_hash(getattr(on, section)) == config_hash(getattr(off, section))
    assert "tracking" not in hashed(on)  # a new key at its default leaves even the whole config's hash as it was


def test_runs_go_to_the_configured_uri_else_the_environment_else_beside_the_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.mlflow_uri(load_config(None, ["root=runs"])) == str(tmp_path / "runs" / "mlruns")
    assert tracking.mlflow_uri(load_config(None, ["root=s3://bucket/runs"])) == str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.mlflow_uri(load_config(None, ["root=runs"])) == "http://mlflow.internal:5000"
    cfg = load_config(None, ["root=runs", "tracking.mlflow_uri=shared/mlruns"])
    assert tracking.mlflow_uri(cfg) == str(tmp_path / "shared" / "mlruns")  # absolute: the controller runs elsewhere


def test_a_stage_that_raises_ends_its_run_failed_with_overlong_values_cut(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"root={tmp_path}", f"model.instruction={'x' * 7000}"])
    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run(cfg, "embed", "v1") as run:
        run.log_final({"counts": {"items": 3}, "note": "text is left out", "valid": {"NDCG@10": 0.5}})
        raise RuntimeError("boom")
    client, runs = mlflow_runs(str(tmp_path / "mlruns"))
    failed = runs["embed-v1"]
    assert failed.info.status == "FAILED" and failed.data.tags["stage"] == "embed"
    assert failed.data.metrics == {"counts/items": 3.0, "valid/NDCG_10": 0.5}
    assert len(failed.data.params["model.instruction"]) == 6000 and failed.data.params["rat.epochs"] == "200"


@pytest.mark.slow
def test_rat_tracks_every_epoch_of_each_variant_and_its_test_figures(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"root={tmp_path}", *RAT])
    prepare(cfg)
    catalog = storage.read_table(dataset_uri(cfg), "catalog")
    vectors = np.random.default_rng(0).normal(size=(catalog.num_rows, 8)).astype(np.float32)
    with storage.publish(embeddings_uri(cfg, "v1"), kind="embeddings", config={}, config_hash="test") as pub:
        pub.write_table("embeddings", embeddings_table(catalog.column("item_id"), catalog.column("text_hash"), vectors))
    uri = rat(cfg)

    client, runs = mlflow_runs(str(tmp_path / "mlruns"))  # the default: a file store beside the outputs
    assert set(runs) == {"prepare-ml-100k", "rat-default"}
    run = runs["rat-default"]
    assert run.info.status == "FINISHED"
    assert run.data.params["rat.item_repr"] == "llm_id" and run.data.params["tracking.enabled"] == "True"
    for variant in ("sasrec-id", "sasrec-llm_id"):
        for metric in ("loss", "valid_ndcg10"):
            assert history(client, run, f"{variant}/{metric}") == [1, 2, 3]
        assert 0 < run.data.metrics[f"variants/{variant}/test/full/overall/NDCG_10"] <= 1
    assert run.data.metrics["items"] == 60 and runs["prepare-ml-100k"].data.metrics["items"] == 60
    # The report a person reads outlives the cluster as the run's artifacts; the manifest names the run.
    assert {"report/report.md", "report/head_tail.png", "report/valid_curve.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert storage.read_manifest(uri)["mlflow"] == {"run_id": run.info.run_id, "tracking_uri": str(tmp_path / "mlruns")}

    scalars, texts = published_events(uri)
    assert scalars["sasrec-llm_id/valid_ndcg10"] == [1, 2, 3] and scalars["sasrec-id/loss"] == [1, 2, 3]
    assert "variants/sasrec-llm_id/test/sampled/tail/HR_10" in scalars and "config/text_summary" in texts
    assert "items" in published_events(dataset_uri(cfg))[0]

    # Tracking is no part of what a run is: turned off, the published result is the same one.
    manifest = storage.read_manifest(uri)
    off = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False))
    assert rat(off) == uri and storage.read_manifest(uri) == manifest


@pytest.mark.slow
def test_scft_tracks_every_step(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [
        f"root={tmp_path}", "dataset.max_items=32", "dataset.num_shards=1", "model.max_length=32",
        "scft.num_workers=1", "scft.batch_size=4", "scft.steps=4", "scft.checkpoint_every=4",
        "scft.augmentation=reference", f"tracking.mlflow_uri={tmp_path / 'tracked'}",
    ])
    prepare(cfg)
    scft(cfg)
    client, runs = mlflow_runs(str(tmp_path / "tracked"))
    run = runs["scft-default"]
    assert run.info.status == "FINISHED" and run.data.params["scft.steps"] == "4"
    assert history(client, run, "loss") == history(client, run, "temperature") == [1, 2, 3, 4]
    assert run.data.metrics["final_loss"] == run.data.metrics["loss"] and run.data.metrics["steps"] == 4
    scalars, texts = published_events(adapter_uri(cfg))
    assert scalars["loss"] == [1, 2, 3, 4] and "final_loss" in scalars and "config/text_summary" in texts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss.png"]
    assert storage.read_manifest(adapter_uri(cfg))["mlflow"]["run_id"] == run.info.run_id


def test_tracking_off_starts_no_run_writes_no_event_file_and_never_imports_mlflow(tmp_path):
    # Its own process: another test may have imported mlflow into this one.
    code = textwrap.dedent(f"""
        import sys
        from llmemb_dist.config import load_config
        from llmemb_dist.stages.prepare.driver import prepare
        prepare(load_config(None, ["root={tmp_path / 'runs'}", "dataset.max_items=30", "tracking.enabled=false"]))
        print(sorted(m for m in sys.modules if m.startswith(("mlflow", "tensorboard", "torch.utils.tensorboard"))))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": str(tmp_path / "mlruns")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert not (tmp_path / "runs" / "mlruns").exists()
    manifest = storage.read_manifest(dataset_uri(load_config(None, [f"root={tmp_path / 'runs'}"])))
    assert not any(f.startswith(tracking.TENSORBOARD_DIR) for f in manifest["files"])
