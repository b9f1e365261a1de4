"""Stage 1, SCFT: contrastive LoRA fine-tuning of the base model on the item catalog.

The driver checks the inputs, reads the catalog with Ray Data into one equal shard per
worker, runs the Ray Train workers (worker.py; DeepSpeed and Ray Train through distributed/),
and publishes the adapter gathered at the final step with its metrics and loss curve.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from llmemb_dist import layout, storage, tracking
from llmemb_dist.config import Config, ConfigError, hashed, to_dict
from llmemb_dist.data.catalog import attribute_columns
from llmemb_dist.distributed import engine as ds_engine
from llmemb_dist.distributed import ray_train
from llmemb_dist.distributed.cluster import init_ray
from llmemb_dist.llm.loading import base_model_info, portable_name, resolve_model
from llmemb_dist.plots import integer_ticks, plt, save
from llmemb_dist.stages.scft.model import engine_spec
from llmemb_dist.stages.scft.worker import ADAPTER_DIR, METRICS_FILE, shard_name, train_worker

log = logging.getLogger(__name__)


def stage_hash(cfg: Config) -> str:
    """What the adapter depends on: the dataset, the model and the SCFT settings."""
    data = json.dumps({k: hashed(getattr(cfg, k)) for k in ("dataset", "model", "scft")}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def warn_about_settings(cfg: Config) -> None:
    """Every value was range-checked when the config was loaded; what is left are legal but risky mixes."""
    if cfg.scft.use_gpu and cfg.model.dtype == "fp16" and cfg.scft.loss == "reference":
        log.warning("the reference loss on raw dot products can overflow in fp16; bf16 is safer")


def read_catalog_shards(cfg: Config) -> dict:
    """The catalog as Ray Data datasets, one equal shard per worker, materialised before training.

    Materialising here keeps Ray Data's read tasks from waiting for CPUs the training
    workers hold, and fixes which items each rank owns for the whole run (restarts included).
    """
    import ray.data

    uri = layout.dataset_uri(cfg)
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
    return {shard_name(rank): shard for rank, shard in enumerate(shards)}


def scft(cfg: Config) -> str:
    """Fine-tunes, publishes the adapter, returns its URI. A run already published with this config is kept."""
    warn_about_settings(cfg)
    source = resolve_model(cfg.model)
    uri = layout.adapter_uri(cfg)
    if storage.already_published(uri, {"config_hash": stage_hash(cfg)}, "adapter", hint="use another scft.run"):
        return uri
    # Before Ray starts, so that a DeepSpeed fragment that cannot be used is refused first; the workers
    # get this spec, so scft.deepspeed is read once a run.
    spec = engine_spec(cfg)
    init_ray(cfg.ray, cfg.log.verbose)
    s = cfg.scft
    with tracking.stage_run(cfg, "scft", s.run) as run:
        shards = read_catalog_shards(cfg)
        result = ray_train.run_training(
            train_worker, {"cfg": cfg, "spec": spec}, name="checkpoints", storage_uri=layout.scft_run_uri(cfg),
            num_workers=s.num_workers, use_gpu=s.use_gpu, cpus_per_worker=s.cpus_per_worker,
            max_failures=s.max_failures, worker_datasets=shards, on_report=run.steps("step"),
        )
        final = storage.join(layout.scft_run_uri(cfg), "checkpoints", ray_train.result_checkpoint_name(result))
        publish_adapter(cfg, spec, source, final, run)
    return uri


def publish_adapter(cfg: Config, spec: ds_engine.EngineSpec, source, checkpoint_uri: str,
                    run: tracking.StageRun) -> None:
    metrics = [json.loads(line) for line in storage.read_bytes(storage.join(checkpoint_uri, METRICS_FILE)).decode().splitlines()]
    steps = metrics[-1]["step"] if metrics else 0
    if steps != cfg.scft.steps:
        raise storage.StorageError(f"{checkpoint_uri}: the last checkpoint is at step {steps}, expected {cfg.scft.steps}")
    with tempfile.TemporaryDirectory() as tmp, storage.publish(
        layout.adapter_uri(cfg), kind="scft_adapter", config=to_dict(cfg), config_hash=stage_hash(cfg),
        inputs={"dataset": layout.dataset_uri(cfg), "checkpoint": checkpoint_uri},
    ) as pub:
        adapter = storage.download_dir(storage.join(checkpoint_uri, ADAPTER_DIR), Path(tmp) / "adapter")
        adapter_config = json.loads((adapter / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = portable_name(cfg.model)
        (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        pub.upload_dir(adapter, "adapter")
        pub.write_text(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
        plot_loss(metrics, Path(tmp) / "plots" / "loss.png")
        pub.upload_dir(Path(tmp) / "plots", "plots")
        run.log_artifacts(Path(tmp) / "plots", "plots")
        pub.info["base_model"] = base_model_info(source, cfg.model)
        pub.info["steps"] = steps
        pub.info["final_loss"] = metrics[-1]["loss"]
        pub.info["workers"] = cfg.scft.num_workers
        pub.info["deepspeed"] = ds_engine.deepspeed_config(spec)  # what the engine ran with, before sizing
        run.log_final({"steps": steps, "final_loss": metrics[-1]["loss"], "workers": cfg.scft.num_workers})
        run.publish(pub)
    log.info("published adapter %s (final loss %.4f after %d steps)", layout.adapter_uri(cfg), metrics[-1]["loss"], steps)


def plot_loss(metrics: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("SCFT loss per step")
    integer_ticks(ax)
    save(fig, path)
