"""The whole pipeline on a small slice: local and S3 roots, the no-op rerun, resume after a failed stage."""
import logging

import pytest

from llmemb_dist import storage
from llmemb_dist.config import ConfigError, load_config
from llmemb_dist.layout import adapter_uri, embeddings_uri, rat_result_uri, report_uri
from llmemb_dist.stages.pipeline import pipeline

from conftest import REPO


def _cfg(root, model_dir, *extra):
    return load_config(REPO / "configs" / "default.yaml", [
        f"root={root}", f"model.path={model_dir}", "model.max_length=32", "dataset.max_items=200",
        "dataset.num_shards=2", "scft.steps=4", "scft.batch_size=8", "scft.checkpoint_every=4", "scft.log_every=2",
        "embed.batch_size=32", "rat.epochs=3", "rat.patience=2", "rat.hidden=32", "rat.max_len=50", *extra,
    ])


def _published(cfg):
    uris = [adapter_uri(cfg), embeddings_uri(cfg), rat_result_uri(cfg), report_uri(cfg)]
    return {u: storage.read_manifest(u)["data_dir"] for u in uris if storage.is_published(u)}


@pytest.mark.slow
def test_pipeline_on_s3_end_to_end(ray_local, s3_root, tiny_llama_dir, capsys):
    cfg = _cfg(s3_root, tiny_llama_dir)
    uri = pipeline(cfg)
    assert uri.startswith("s3://") and len(_published(cfg)) == 4
    out = capsys.readouterr().out
    assert "Adapted item embeddings (the product): s3://" in out and "sasrec-llm" in out and "sasrec-id" in out
    items = storage.read_table(rat_result_uri(cfg), "item_embeddings")
    assert items.num_rows == storage.read_manifest(embeddings_uri(cfg))["counts"]["items"]
    report = storage.read_bytes(storage.join(storage.data_uri(uri), "report.md")).decode()
    assert "loss.png" in report and "head_tail.png" in report and "valid_curve.png" in report


@pytest.mark.slow
def test_failed_stage_keeps_earlier_outputs_and_rerun_resumes_then_no_op(ray_local, tmp_path, tiny_llama_dir, caplog):
    caplog.set_level(logging.INFO)
    broken = _cfg(tmp_path, tiny_llama_dir, "embed.pca_dim=100000")  # fails inside the embedding stage
    with pytest.raises(ConfigError, match="embed.pca_dim"):
        pipeline(broken)
    after_failure = _published(broken)
    assert list(after_failure) == [adapter_uri(broken)]  # SCFT published, nothing after it
    scft_manifest = storage.read_manifest(adapter_uri(broken))

    fixed = _cfg(tmp_path, tiny_llama_dir)
    caplog.clear()
    pipeline(fixed)
    assert storage.read_manifest(adapter_uri(fixed)) == scft_manifest  # resumed after SCFT, which stayed intact
    skipped = [r.getMessage() for r in caplog.records if "nothing to do" in r.getMessage()]
    assert len(skipped) == 2 and "dataset" in skipped[0] and "adapter" in skipped[1]
    first = _published(fixed)
    assert len(first) == 4

    caplog.clear()
    pipeline(fixed)
    assert _published(fixed) == first
    assert len([r for r in caplog.records if "nothing to do" in r.getMessage()]) == 5
