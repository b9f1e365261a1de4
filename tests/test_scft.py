"""SCFT end to end: real local Ray, real DeepSpeed on CPU (gloo), the moto S3 server."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.distributed.engine import CHECKPOINT_TAG, consolidated_checkpoint_weights
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.layout import adapter_uri, scft_run_uri
from llmemb_dist.stages.scft.driver import scft

from conftest import Payload


def scft_config(root: str, model: Path, *extra: str):
    return load_config(None, [
        f"root={root}", "dataset.max_items=64", "dataset.num_shards=2",
        f"model.path={model}", "model.max_length=48",
        "scft.num_workers=2", "scft.batch_size=8", "scft.steps=8", "scft.checkpoint_every=4",
        "scft.lr=0.002", "scft.temperature_init=0.1", "scft.augmentation=reference", *extra,
    ])


def published_metrics(cfg) -> list[dict]:
    data = storage.data_uri(adapter_uri(cfg))
    return [json.loads(line) for line in storage.read_bytes(storage.join(data, "metrics.jsonl")).decode().splitlines()]


def assert_loss_falls(metrics: list[dict]) -> None:
    first = sum(m["loss"] for m in metrics[:2]) / 2
    last = sum(m["loss"] for m in metrics[-2:]) / 2
    assert last < first, [round(m["loss"], 3) for m in metrics]


def backbone_bytes(model_dir: Path) -> int:
    from transformers import AutoModel

    return sum(p.numel() * p.element_size() for p in AutoModel.from_pretrained(model_dir).parameters())


def load_published_adapter(cfg, model_dir: Path, tmp_path: Path):
    from transformers import AutoModel
    from peft import PeftModel

    local = storage.download_dir(storage.join(storage.data_uri(adapter_uri(cfg)), "adapter"), tmp_path / "adapter")
    return PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), str(local))


@pytest.mark.slow
def test_zero2_survives_a_worker_failure(ray_local, s3_root, tiny_llama_dir, tmp_path):
    cfg = scft_config(s3_root, tiny_llama_dir, "scft.zero_stage=2", "scft.fail_at_step=5", "scft.max_failures=1")
    prepare(cfg)
    assert scft(cfg) == adapter_uri(cfg)

    manifest = storage.read_manifest(adapter_uri(cfg))
    assert manifest["kind"] == "scft_adapter" and manifest["steps"] == 8
    assert manifest["base_model"]["fingerprint"]
    assert "plots/loss.png" in manifest["files"]
    assert storage.exists(storage.join(scft_run_uri(cfg), "fault_injected"))  # the failure did happen
    assert {"step_00000004", "step_00000008"} <= set(storage.list_dirs(storage.join(scft_run_uri(cfg), "checkpoints")))
    metrics = published_metrics(cfg)
    assert [m["step"] for m in metrics] == list(range(1, 9))  # every step once, none repeated after the restart
    assert metrics[-1]["model_state_mb"] * 2**20 > backbone_bytes(tiny_llama_dir)  # ZeRO-2 keeps whole weights
    assert manifest["final_loss"] == metrics[-1]["loss"]
    assert_loss_falls(metrics)
    assert load_published_adapter(cfg, tiny_llama_dir, tmp_path) is not None


@pytest.mark.slow
def test_zero3_resumes_after_driver_restart_and_saves_the_engine_weights(ray_local, s3_root, tiny_llama_dir, tmp_path):
    cfg = scft_config(s3_root, tiny_llama_dir, "scft.zero_stage=3", "scft.fail_at_step=5", "scft.max_failures=0")
    prepare(cfg)
    with pytest.raises(Exception, match="injected failure"):
        scft(cfg)  # the driver gives up: no retries left
    assert not storage.is_published(adapter_uri(cfg))

    # A pickle planted in the checkpoint (as anyone who can write the bucket could) is refused unread.
    step4 = storage.join(scft_run_uri(cfg), "checkpoints", "step_00000004")
    local = storage.download_dir(step4, tmp_path / "step4")
    shard = sorted((local / CHECKPOINT_TAG).glob("*.pt"))[0]
    marker = tmp_path / "payload-ran"
    storage.write_bytes(storage.join(step4, CHECKPOINT_TAG, shard.name), pickle.dumps(Payload(marker)))
    with pytest.raises(Exception, match="differs from the digests"):
        scft(cfg)
    assert not marker.exists() and not storage.is_published(adapter_uri(cfg))
    storage.write_bytes(storage.join(step4, CHECKPOINT_TAG, shard.name), shard.read_bytes())

    scft(cfg)  # a new driver, same run name: resumes from the step-4 checkpoint

    metrics = published_metrics(cfg)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert_loss_falls(metrics)
    # Each of the 2 ranks holds half the backbone, plus its share of the small adapter's state.
    assert 0.45 < metrics[-1]["model_state_mb"] * 2**20 / backbone_bytes(tiny_llama_dir) < 0.6

    # The adapter gathered from the ZeRO-3 shards equals the weights DeepSpeed's own
    # zero_to_fp32 rebuilds from the final checkpoint's optimizer partitions.
    ckpt = storage.download_dir(storage.join(scft_run_uri(cfg), "checkpoints", "step_00000008"), tmp_path / "ckpt")
    assert (ckpt / CHECKPOINT_TAG).is_dir()
    engine_weights = consolidated_checkpoint_weights(ckpt)
    peft_model = load_published_adapter(cfg, tiny_llama_dir, tmp_path)
    saved = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    lora_engine = {n[len("encoder.backbone."):]: w for n, w in engine_weights.items() if "lora_" in n}
    assert saved and set(saved) == set(lora_engine)
    for name, value in saved.items():
        torch.testing.assert_close(value.detach().float(), lora_engine[name].float(), rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for n, v in saved.items() if "lora_B" in n)  # trained, not the zero init


@pytest.mark.slow
def test_minilm_fine_tunes_through_the_same_path_with_accumulation_and_users_deepspeed_settings(
        ray_local, s3_root, minilm_dir, tmp_path):
    fragment = storage.join(s3_root, "ds.json")  # a fragment on storage, as a cluster's workers read it
    storage.write_bytes(fragment, b'{"zero_optimization": {"reduce_bucket_size": 200000}, "gradient_clipping": 0.7}')
    cfg = scft_config(s3_root, minilm_dir, "scft.zero_stage=2", "scft.augmentation=fresh", "scft.steps=6",
                      "scft.checkpoint_every=6", "scft.grad_accumulation=2", f"scft.deepspeed={fragment}")
    prepare(cfg)
    scft(cfg)
    deepspeed = storage.read_manifest(adapter_uri(cfg))["deepspeed"]
    assert deepspeed["gradient_accumulation_steps"] == 2 and deepspeed["gradient_clipping"] == 0.7
    assert deepspeed["zero_optimization"]["reduce_bucket_size"] == 200000
    metrics = published_metrics(cfg)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert load_published_adapter(cfg, minilm_dir, tmp_path) is not None
