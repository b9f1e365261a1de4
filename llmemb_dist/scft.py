"""Stage 1, SCFT: contrastive LoRA fine-tuning of the base model on the item catalog.

The driver checks the inputs, reads the catalog with Ray Data into one equal shard per
worker, runs the Ray Train workers (scft_worker.py, DeepSpeed through engine.py), and
publishes the adapter gathered at the final step with its metrics and loss curve.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from llmemb_dist import storage
from llmemb_dist.cluster import init_ray
from llmemb_dist.config import Config, ConfigError, to_dict
from llmemb_dist.data.catalog import attribute_columns
from llmemb_dist.distributed.engine import check_zero_stage
from llmemb_dist.distributed.ray_train import run_training
from llmemb_dist.llm.loading import base_model_info, resolve_model
from llmemb_dist.prepare import dataset_uri
from llmemb_dist.scft_worker import ADAPTER_DIR, METRICS_FILE, run_dir_uri, train_worker

log = logging.getLogger(__name__)


def adapter_uri(cfg: Config) -> str:
    return storage.join(run_dir_uri(cfg), "adapter")


def stage_hash(cfg: Config) -> str:
    """What the adapter depends on: the dataset, the model and the SCFT settings."""
    data = json.dumps({k: to_dict(getattr(cfg, k)) for k in ("dataset", "model", "scft")}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def check_settings(cfg: Config) -> None:
    s = cfg.scft
    check_zero_stage(s.zero_stage)
    for key in ("num_workers", "steps", "checkpoint_every", "log_every"):
        if getattr(s, key) < 1:
            raise ConfigError(f"scft.{key} must be at least 1, got {getattr(s, key)}")
    if s.batch_size < 2:
        raise ConfigError(f"scft.batch_size must be at least 2 (a contrastive batch needs negatives), got {s.batch_size}")
    if not 0 <= s.drop_ratio < 1:
        raise ConfigError(f"scft.drop_ratio must be in [0, 1), got {s.drop_ratio}")
    if not 0 < s.temperature_min <= s.temperature_init <= s.temperature_max:
        raise ConfigError(
            f"scft.temperature_init {s.temperature_init} must lie in "
            f"[scft.temperature_min {s.temperature_min}, scft.temperature_max {s.temperature_max}]"
        )
    if s.use_gpu and cfg.model.dtype == "fp16" and s.loss == "reference":
        log.warning("the reference loss on raw dot products can overflow in fp16; bf16 is safer")


def read_catalog_shards(cfg: Config) -> dict:
    """The catalog as Ray Data datasets, one equal shard per worker, materialised before training.

    Materialising here keeps Ray Data's read tasks from waiting for CPUs the training
    workers hold, and fixes which items each rank owns for the whole run (restarts included).
    """
    import ray.data

    uri = dataset_uri(cfg)
    files = storage.table_files(uri, "catalog")
    fs, _ = storage.resolve(files[0])
    ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs)
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    if not attribute_columns(ds.schema().names):
        raise storage.DataError(f"{uri}/catalog ({files[0]}): the catalog has no attribute columns to build prompts from")
    workers, per_worker = cfg.scft.num_workers, ds.count() // cfg.scft.num_workers
    if cfg.scft.batch_size > per_worker:
        raise ConfigError(
            f"scft.batch_size {cfg.scft.batch_size} is larger than a worker's shard "
            f"({ds.count()} items / {workers} workers = {per_worker})"
        )
    shards = ds.split(workers, equal=True)
    for shard in shards:
        # Each worker reads its shard once; a progress bar left behind keeps repainting from the idle
        # worker process for the rest of the job.
        shard.context.enable_progress_bars = False
    return {f"catalog_{rank}": shard for rank, shard in enumerate(shards)}


def scft(cfg: Config) -> str:
    """Fine-tunes, publishes the adapter, returns its URI. A run already published with this config is kept."""
    from ray.train import DataConfig

    check_settings(cfg)
    source = resolve_model(cfg.model)
    uri = adapter_uri(cfg)
    if storage.is_published(uri):
        if storage.read_manifest(uri)["config_hash"] == stage_hash(cfg):
            log.info("adapter %s is already published with this config: nothing to do", uri)
            return uri
        raise storage.AlreadyPublished(f"{uri} is published from another config; use another scft.run")
    init_ray(cfg.ray)
    shards = read_catalog_shards(cfg)
    s = cfg.scft
    result = run_training(
        train_worker, {"cfg": cfg}, name="checkpoints", storage_uri=run_dir_uri(cfg),
        num_workers=s.num_workers, use_gpu=s.use_gpu, cpus_per_worker=s.cpus_per_worker,
        max_failures=s.max_failures, datasets=shards,
        # Each worker reads only its own named shard; Ray must not split them again.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    final = storage.join(run_dir_uri(cfg), "checkpoints", Path(result.checkpoint.path).name)
    publish_adapter(cfg, source, final)
    return uri


def publish_adapter(cfg: Config, source, checkpoint_uri: str) -> None:
    metrics = [json.loads(line) for line in storage.read_bytes(storage.join(checkpoint_uri, METRICS_FILE)).decode().splitlines()]
    steps = metrics[-1]["step"] if metrics else 0
    if steps != cfg.scft.steps:
        raise storage.StorageError(f"{checkpoint_uri}: the last checkpoint is at step {steps}, expected {cfg.scft.steps}")
    with tempfile.TemporaryDirectory() as tmp, storage.publish(
        adapter_uri(cfg), kind="scft_adapter", config=to_dict(cfg), config_hash=stage_hash(cfg),
        inputs={"dataset": dataset_uri(cfg), "checkpoint": checkpoint_uri},
    ) as pub:
        adapter = storage.download_dir(storage.join(checkpoint_uri, ADAPTER_DIR), Path(tmp) / "adapter")
        pub.upload_dir(adapter, "adapter")
        pub.write_text(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
        plot_loss(metrics, Path(tmp) / "plots" / "loss.png")
        pub.upload_dir(Path(tmp) / "plots", "plots")
        pub.info["base_model"] = base_model_info(source, cfg.model)
        pub.info["steps"] = steps
        pub.info["final_loss"] = metrics[-1]["loss"]
        pub.info["workers"] = cfg.scft.num_workers
    log.info("published adapter %s (final loss %.4f after %d steps)", adapter_uri(cfg), metrics[-1]["loss"], steps)


def plot_loss(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("SCFT loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
