"""The SCFT training loop that runs on each Ray Train worker.

Each worker loads the base model with LoRA, wraps it in a DeepSpeed engine (engine.py),
and trains on its own shard of the catalog. Checkpoints go through Ray Train storage;
the step in them fixes the data order on resume (scft_data.py).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmemb_dist import storage
from llmemb_dist.config import Config
from llmemb_dist.data.catalog import ITEM_ID, attribute_columns, item_attributes
from llmemb_dist.distributed import engine as ds
from llmemb_dist.llm import losses
from llmemb_dist.llm.loading import ItemEncoder, attach_lora, load_backbone, load_tokenizer, resolve_model, tokenize
from llmemb_dist.scft_data import Views, batch_indices

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"


class InjectedFault(RuntimeError):
    """Raised once by rank 0 at scft.fail_at_step, to exercise recovery."""


class ContrastiveModel(nn.Module):
    """The item encoder, the learnable temperature and the loss in one module.

    One module, so DeepSpeed optimises the temperature with the LoRA weights and, under
    ZeRO-3, gathers both when the forward runs.
    """

    def __init__(self, encoder: ItemEncoder, loss: str, temperature: losses.Temperature, gather: bool):
        super().__init__()
        self.encoder, self.temperature = encoder, temperature
        self.loss, self.gather = loss, gather

    def forward(self, view_a: dict[str, torch.Tensor], view_b: dict[str, torch.Tensor]):
        n = view_a["input_ids"].size(0)
        # Both views in one forward: one pass through the (ZeRO-3 gathered) layers, not two.
        width = max(view_a["input_ids"].size(1), view_b["input_ids"].size(1))
        ids = torch.cat([_pad(view_a["input_ids"], width), _pad(view_b["input_ids"], width)])
        mask = torch.cat([_pad(view_a["attention_mask"], width), _pad(view_b["attention_mask"], width)])
        emb = self.encoder(ids, mask)
        a, b = emb[:n], emb[n:]
        t = self.temperature()
        loss = losses.info_nce(a, b, t, self.gather) if self.loss == "infonce" else losses.reference_loss(a, b, t)
        return loss, a, b, t


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.size(1)))


def run_dir_uri(cfg: Config) -> str:
    return storage.join(cfg.root, "scft", cfg.scft.run)


def load_shard(rank: int) -> list[list[tuple[str, str]]]:
    """This worker's catalog rows (its Ray Data shard), as attribute lists in item_id order."""
    import pyarrow as pa
    import ray.train

    shard = ray.train.get_dataset_shard(f"catalog_{rank}")
    table = pa.concat_tables(list(shard.iter_batches(batch_format="pyarrow", batch_size=None)))
    table = table.sort_by(ITEM_ID)  # block order may vary between runs; the row order must not
    columns = attribute_columns(table.schema)
    return [item_attributes(row, columns) for row in table.to_pylist()]


def build_model(cfg: Config) -> tuple[ContrastiveModel, Any]:
    source = resolve_model(cfg.model)
    torch.manual_seed(cfg.scft.seed)  # identical LoRA init on every rank
    with ds.model_init_context(engine_spec(cfg)):
        encoder = ItemEncoder(attach_lora(load_backbone(source, cfg.model), cfg.model.lora), cfg.model.pooling)
    s = cfg.scft
    temperature = losses.Temperature(s.temperature_init, s.temperature_min, s.temperature_max)
    return ContrastiveModel(encoder, s.loss, temperature, s.gather_negatives), load_tokenizer(source)


def engine_spec(cfg: Config) -> ds.EngineSpec:
    s = cfg.scft
    return ds.EngineSpec(
        zero_stage=s.zero_stage, dtype=cfg.model.dtype, micro_batch=s.batch_size, lr=s.lr,
        weight_decay=s.weight_decay, warmup_steps=s.warmup_steps, offload_optimizer=s.offload_optimizer,
        use_gpu=s.use_gpu,
    )


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg: Config = loop_config["cfg"]
    s = cfg.scft
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    items = load_shard(rank)
    memory = PeakMemory(s.use_gpu)
    model, tokenizer = build_model(cfg)
    # Training memory: the engine, its buffers and the steps, over the (partitioned) model. Left out:
    # the load's transient peak, where rank 0 holds the whole checkpoint it streams into the slices.
    memory.reset()
    engine = ds.build_engine(model, engine_spec(cfg))
    device = engine.device
    views = Views(items, cfg.model.instruction, s.drop_ratio, s.augmentation, s.seed, rank)

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = ds.load_checkpoint(engine, folder)
            start = state["step"]
            # Steps after the checkpoint will run again; their old log lines are dropped.
            history = [m for m in _read_metrics(Path(folder)) if m["step"] <= start]
        log.info("rank %d resumed at step %d", rank, start)

    fault_marker = storage.join(run_dir_uri(cfg), "fault_injected")
    engine.train()
    t_last, items_since = time.perf_counter(), 0
    for step in range(start, s.steps):
        if step == s.fail_at_step and rank == 0 and not storage.exists(fault_marker):
            storage.write_bytes(fault_marker, b"")  # once per run, even if we resume before this step
            raise InjectedFault(f"scft.fail_at_step: injected failure at step {step}")
        # LoRA dropout draws from torch's global generator, which a checkpoint does not hold: seeding it
        # from (seed, rank, step) makes a resumed run draw the same masks as an uninterrupted one.
        torch.manual_seed(s.seed * 1_000_003 + rank * 10_007 + step)
        idx = batch_indices(len(items), s.batch_size, step, s.seed, rank)
        prompts_a, prompts_b = views.prompts(idx, step)
        view_a = {k: v.to(device) for k, v in tokenize(tokenizer, prompts_a, cfg.model.max_length).items()}
        view_b = {k: v.to(device) for k, v in tokenize(tokenizer, prompts_b, cfg.model.max_length).items()}
        loss, a, b, t = engine(view_a, view_b)
        engine.backward(loss)
        engine.step()
        items_since += len(idx)

        done = step + 1
        save = done % s.checkpoint_every == 0 or done == s.steps
        if not (save or done % s.log_every == 0):
            continue
        now = time.perf_counter()
        metrics = {
            "step": done,
            "loss": _mean_over_workers(loss.detach().float(), world),
            "temperature": float(t.detach()),
            "alignment": losses.alignment(a, b),
            "uniformity": losses.uniformity(torch.cat([a, b])),
            "items_per_s_per_worker": items_since / (now - t_last),
            "lr": engine.get_lr()[0],
            "peak_memory_mb": memory.peak_mb(),
        }
        t_last, items_since = now, 0
        history.append(metrics)
        if rank == 0:
            eta = (s.steps - done) / max(metrics["items_per_s_per_worker"] / s.batch_size, 1e-9)
            log.info("step %d/%d loss %.4f t %.3f (ETA %.0f s)", done, s.steps, metrics["loss"], metrics["temperature"], eta)
        if save:
            _report_with_checkpoint(engine, metrics, history, rank, final=done == s.steps)
        else:
            ray.train.report(metrics)


def _report_with_checkpoint(engine, metrics: dict, history: list[dict], rank: int, final: bool) -> None:
    import ray.train
    from ray.train import Checkpoint

    step = metrics["step"]
    # The LoRA gather is a collective: every rank takes part, rank 0 writes.
    weights = ds.trainable_state_dict(engine) if final else None
    with tempfile.TemporaryDirectory() as tmp:
        ds.save_checkpoint(engine, tmp, {"step": step})
        if rank == 0:
            (Path(tmp) / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
            if final:
                _save_adapter(engine.module, weights, Path(tmp) / ADAPTER_DIR)
        # Every rank uploads its own files into the same checkpoint folder.
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:08d}")


def _save_adapter(model: ContrastiveModel, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """The LoRA weights in peft format (adapter_config.json + adapter_model.safetensors)."""
    prefix = "encoder.backbone."
    lora = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    model.encoder.backbone.save_pretrained(str(folder), state_dict=lora)
    t = model.temperature
    value = weights["temperature.log_value"].exp().clamp(t.low, t.high)
    (folder / "temperature.json").write_text(json.dumps({"temperature": float(value)}))


class PeakMemory:
    """Peak memory of this worker since the last reset.

    GPU: the peak of torch's allocations. CPU: the peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set at construction (before the model is loaded), so
    the constant cost of Python, torch and Ray is left out and what remains is model, gradients,
    optimizer state, activations and DeepSpeed's buffers.
    """

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu
        self.baseline_mb = 0.0 if use_gpu else _proc_status_mb("VmRSS")
        self.reset()

    def reset(self) -> None:
        if self.use_gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.use_gpu:
            return torch.cuda.max_memory_allocated() / 2**20
        return _proc_status_mb("VmHWM") - self.baseline_mb


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mean_over_workers(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)
