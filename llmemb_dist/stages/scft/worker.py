"""The SCFT training loop that runs on each Ray Train worker.

Each worker loads the base model with LoRA, wraps it in a DeepSpeed engine (distributed/engine.py),
and trains on its own shard of the catalog. Checkpoints go through Ray Train storage
(distributed/ray_train.py); the step in them fixes the data order on resume (batches.py).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmemb_dist import layout, storage
from llmemb_dist.config import Config
from llmemb_dist.data.catalog import ITEM_ID, attribute_columns, item_attributes
from llmemb_dist.distributed import engine as ds_engine
from llmemb_dist.distributed import ray_train
from llmemb_dist.distributed.collective import mean_over_workers
from llmemb_dist.llm import losses
from llmemb_dist.llm.loading import tokenize
from llmemb_dist.progress import Progress
from llmemb_dist.stages.scft.batches import Views, batch_indices
from llmemb_dist.stages.scft.memory import PeakMemory
from llmemb_dist.stages.scft.model import ContrastiveModel, build_contrastive_model

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"


class InjectedFault(RuntimeError):
    """Raised once by rank 0 at scft.fail_at_step, to exercise recovery."""


def shard_name(rank: int) -> str:
    """The name of rank `rank`'s catalog shard among the run's datasets."""
    return f"catalog_{rank}"


def load_shard(rank: int) -> list[list[tuple[str, str]]]:
    """This worker's catalog rows (its Ray Data shard), as attribute lists in item_id order."""
    table = ray_train.dataset_shard(shard_name(rank))
    table = table.sort_by(ITEM_ID)  # block order may vary between runs; the row order must not
    columns = attribute_columns(table.schema)
    return [item_attributes(row, columns) for row in table.to_pylist()]


def train_worker(loop_config: dict[str, Any]) -> None:
    cfg: Config = loop_config["cfg"]
    spec: ds_engine.EngineSpec = loop_config["spec"]  # made by the driver from cfg: no worker reads scft.deepspeed
    s = cfg.scft
    worker = ray_train.worker_info()
    rank = worker.rank
    items = load_shard(rank)
    memory = PeakMemory(s.use_gpu)
    model, tokenizer = build_contrastive_model(cfg, spec)
    # Training memory: the engine, its buffers and the steps, over the (partitioned) model. Left out:
    # the load's transient peak, where rank 0 holds the whole checkpoint it streams into the slices.
    memory.reset()
    engine = ds_engine.build_engine(model, spec)
    device = engine.device
    views = Views(items, cfg.model.instruction, s.drop_ratio, s.augmentation, s.seed, rank)

    start, history = 0, []
    with ray_train.restored_checkpoint() as folder:
        if folder is not None:
            state = ds_engine.load_checkpoint(engine, folder)
            start = state["step"]
            # Steps after the checkpoint will run again; their old log lines are dropped.
            history = [m for m in _read_metrics(folder) if m["step"] <= start]
            log.info("rank %d resumed at step %d", rank, start)

    fault_marker = layout.scft_fault_marker(cfg)
    progress = Progress(log, "scft step", s.steps, start=start)
    engine.train()
    t_last, items_since = time.perf_counter(), 0
    for step in range(start, s.steps):
        if step == s.fail_at_step and rank == 0 and not storage.exists(fault_marker):
            storage.write_bytes(fault_marker, b"")  # once per run, even if we resume before this step
            raise InjectedFault(f"scft.fail_at_step: injected failure at step {step}")
        step_loss = 0.0
        for micro in range(s.grad_accumulation):
            # Micro-batch `batch` of the run: with no accumulation, the step itself.
            batch = step * s.grad_accumulation + micro
            # LoRA dropout draws from torch's global generator, which a checkpoint does not hold: seeding it
            # from (seed, rank, batch) makes a resumed run draw the same masks as an uninterrupted one.
            torch.manual_seed(s.seed * 1_000_003 + rank * 10_007 + batch)
            idx = batch_indices(len(items), s.batch_size, batch, s.seed, rank)
            prompts_a, prompts_b = views.prompts(idx, batch)
            view_a = {k: v.to(device) for k, v in tokenize(tokenizer, prompts_a, cfg.model.max_length).items()}
            view_b = {k: v.to(device) for k, v in tokenize(tokenizer, prompts_b, cfg.model.max_length).items()}
            loss, a, b, t = engine(view_a, view_b)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates the weights at the last micro-batch of the step only
            step_loss += loss.detach().float() / s.grad_accumulation
            items_since += len(idx)

        done = step + 1
        save = done % s.checkpoint_every == 0 or done == s.steps
        if not (save or done % s.log_every == 0):
            continue
        now = time.perf_counter()
        metrics = {
            "step": done,
            "loss": mean_over_workers(step_loss, worker.world),
            "temperature": float(t.detach()),
            "alignment": losses.alignment(a, b),
            "uniformity": losses.uniformity(torch.cat([a, b])),
            "items_per_s_per_worker": items_since / (now - t_last),
            "lr": engine.get_lr()[0],
            "peak_memory_mb": memory.peak_mb(),
            "model_state_mb": ds_engine.model_state_bytes(engine) / 2**20,
        }
        t_last, items_since = now, 0
        history.append(metrics)
        if rank == 0:
            progress.update(done, f"loss {metrics['loss']:.4f}, t {metrics['temperature']:.3f}")
        if save:
            _report_with_checkpoint(engine, metrics, history, rank, final=done == s.steps)
        else:
            ray_train.report(metrics)


def _report_with_checkpoint(engine, metrics: dict, history: list[dict], rank: int, final: bool) -> None:
    step = metrics["step"]
    # The LoRA gather is a collective: every rank takes part, rank 0 writes.
    weights = ds_engine.trainable_state_dict(engine) if final else None
    with tempfile.TemporaryDirectory() as tmp:
        ds_engine.save_checkpoint(engine, tmp, {"step": step})
        if rank == 0:
            (Path(tmp) / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
            if final:
                _save_adapter(engine.module, weights, Path(tmp) / ADAPTER_DIR)
        # Every rank uploads its own files into the same checkpoint folder.
        ray_train.report(metrics, tmp, folder_name=f"step_{step:08d}")


def _save_adapter(model: ContrastiveModel, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """The LoRA weights in peft format (adapter_config.json + adapter_model.safetensors)."""
    prefix = "encoder.backbone."
    lora = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    model.encoder.backbone.save_pretrained(str(folder), state_dict=lora)
    t = model.temperature
    value = weights["temperature.log_value"].exp().clamp(t.low, t.high)
    (folder / "temperature.json").write_text(json.dumps({"temperature": float(value)}))


def _read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
