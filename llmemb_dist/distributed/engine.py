"""The one place that knows DeepSpeed: configs, engines, LoRA gathering, checkpoints.

Stages hand in a plain `nn.Module` and get back an engine with forward/backward/step;
nothing else imports deepspeed (the OpenRLHF "strategy" pattern).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmemb_dist.config import ZeroStage, flatten

CHECKPOINT_TAG = "ds"  # a fixed tag: the Ray Train checkpoint folder already names the step


@dataclass(frozen=True)
class EngineSpec:
    zero_stage: ZeroStage  # checked by the config layer, like every value that reaches here
    dtype: str  # fp32 | bf16 | fp16
    micro_batch: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    offload_optimizer: bool = False
    use_gpu: bool = False
    gradient_clipping: float = 1.0
    grad_accumulation: int = 1
    user_config: str = "{}"  # JSON of a user's DeepSpeed settings, merged over ours (see `merge_user_config`)


# Settings a user's DeepSpeed fragment may not change, and why: this system sets them from its own keys.
OURS = {
    "train_micro_batch_size_per_gpu": "it is scft.batch_size, the batch the data loader builds",
    "train_batch_size": "it follows from scft.batch_size, scft.grad_accumulation and scft.num_workers",
    "gradient_accumulation_steps": "it is scft.grad_accumulation, which the training loop follows",
    "zero_optimization.stage": "it is scft.zero_stage, which model loading follows too",
    "bf16.enabled": "it follows model.dtype",
    "fp16.enabled": "it follows model.dtype",
}


def check_user_config(fragment: dict[str, Any], source: str) -> None:
    """A fragment that sets one of OURS is refused by name before anything runs."""
    for key in flatten(fragment):
        if key in OURS:
            raise ValueError(f"{source}: DeepSpeed setting {key!r} cannot be set here: {OURS[key]}")


def merge_user_config(ours: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """`fragment` over `ours`, section by section (a nested mapping merges, anything else replaces)."""
    out = dict(ours)
    for key, value in fragment.items():
        out[key] = merge_user_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(spec: EngineSpec, params: int = 0, trainable: int = 0) -> dict[str, Any]:
    """The DeepSpeed config; `params` and `trainable` (element counts) size the buffers to the model."""
    # torch's AdamW instead of DeepSpeed's JIT-built cpu_adam/fused_adam (a C++ compile on each
    # new machine); only optimizer offload on GPUs wants DeepSpeed's vectorised CPU Adam.
    torch_adam = not (spec.use_gpu and spec.offload_optimizer)
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if spec.zero_stage == 3:
        # Partition every parameter, small LoRA matrices included (DeepSpeed keeps those under 1e5
        # elements whole by default): the memory figures then mean what they say, and the adapter
        # must really be gathered before it is saved.
        zero["stage3_param_persistence_threshold"] = 0
        if params:
            # DeepSpeed's defaults (1e9 elements live, 1e9 reuse distance) keep every layer of a model
            # under 1B parameters gathered from its forward until its backward, i.e. the whole model
            # on every rank. An eighth of the model bounds what is gathered at once to a few layers.
            window = max(params // 8, 1)
            zero.update(stage3_max_live_parameters=window, stage3_max_reuse_distance=window,
                        stage3_prefetch_bucket_size=window)
    if trainable:
        # The default 5e8-element gradient bucket dwarfs a LoRA adapter; one bucket holds all of it.
        zero["reduce_bucket_size"] = min(trainable, 500_000_000)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accumulation,
        "gradient_clipping": spec.gradient_clipping,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.lr, "weight_decay": spec.weight_decay, "betas": [0.9, 0.999], "torch_adam": torch_adam},
        },
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": not torch_adam,
        "bf16": {"enabled": spec.dtype == "bf16"},
        "fp16": {"enabled": spec.dtype == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if spec.warmup_steps > 0:  # WarmupLR starts at lr 0, so without warmup there is no scheduler at all
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": spec.lr, "warmup_num_steps": spec.warmup_steps,
                       "warmup_type": "linear"},
        }
    import json

    return merge_user_config(config, json.loads(spec.user_config))


@contextmanager
def model_init_context(spec: EngineSpec) -> Iterator[None]:
    """Enter while loading the Hugging Face backbone: under ZeRO-3 it is built already partitioned.

    With a live HfDeepSpeedConfig, transformers' from_pretrained creates each layer inside
    deepspeed.zero.Init (every rank keeps only its slice) and rank 0 streams the checkpoint into
    the slices, so no rank ever holds the whole model. transformers keeps only a weak reference,
    hence the local variable held for the duration of the block. Other stages: a no-op.
    """
    if spec.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    os.environ.setdefault("LOCAL_RANK", "0")
    hf_config = HfDeepSpeedConfig(deepspeed_config(spec))
    try:
        yield
    finally:
        del hf_config


def build_engine(model: nn.Module, spec: EngineSpec):
    """A DeepSpeed engine over the model's trainable parameters (the frozen base is never in the optimizer)."""
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(spec, sum(map(_numel, model.parameters())), sum(map(_numel, trainable)))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    return engine


def _numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter is empty locally


def model_state_bytes(engine) -> int:
    """Bytes of model state this rank holds: its parameters (a ZeRO-3 rank its slices only), their
    gradients, and the optimizer's master copies, gradients and moments. A storage is counted once:
    ZeRO's partitions are views into flat buffers that the optimizer holds as well.

    The figure ZeRO partitions, counted from the tensors: on CPU, DeepSpeed's own memory report is the
    process's resident set, which also holds activations and whatever the allocator kept of freed memory.
    """
    seen: set[int] = set()

    def size(t: torch.Tensor | None) -> int:
        if t is None or not t.numel():
            return 0
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    total = sum(size(getattr(p, "ds_tensor", p)) + size(p.grad) for p in engine.module.parameters())
    # ZeRO wraps the torch optimizer; ZeRO-3 hands it its flat partitions only during a step, but
    # their moments stay in its state, and their gradients in one flat buffer.
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = [p for group in optimizer.param_groups for p in group["params"]] + list(optimizer.state)
    total += size(getattr(engine.optimizer, "grad_partitions_flat_buffer", None))
    for p in masters:
        total += size(p) + size(p.grad)
        total += sum(size(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    return total


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole and on CPU, on every rank.

    Under ZeRO-3 each rank holds a slice; GatheredParameters assembles them (a collective:
    every rank must call this) so the saved adapter is not the empty one the pitfall warns of.
    Without ZeRO-3 the context is a no-op.
    """
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().float().cpu().clone() for n, p in named}


# DeepSpeed writes its checkpoints with torch.save and reads them with torch.load(weights_only=False),
# which runs whatever a pickle asks for; the checkpoints live where Ray Train puts them, not behind a
# manifest. So every rank records the SHA-256 of each file it wrote, signed with LLMEMB_CHECKPOINT_KEY
# when that is set (then nobody without the key can forge a record), and nothing is handed to
# DeepSpeed until every file under the tag folder matches a record.
DIGESTS = "digests-rank{rank}.json"
KEY_ENV = "LLMEMB_CHECKPOINT_KEY"


class CheckpointTampered(Exception):
    """A checkpoint file that no digest record vouches for; nothing of the checkpoint was loaded."""


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(files: dict[str, str]) -> str | None:
    import hashlib
    import hmac
    import json

    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    return hmac.new(key.encode(), json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_digests(folder: str | Path, rank: int) -> None:
    """The digest record of the files this rank wrote under `folder`/CHECKPOINT_TAG."""
    import json

    folder = Path(folder)
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted((folder / CHECKPOINT_TAG).rglob("*")) if p.is_file()}
    (folder / DIGESTS.format(rank=rank)).write_text(json.dumps({"files": files, "hmac": _signature(files)}))


def verify_checkpoint(folder: str | Path) -> None:
    """Every file under `folder`/CHECKPOINT_TAG matches a digest record of the ranks that wrote it."""
    import hmac
    import json

    folder = Path(folder)
    vouched: dict[str, str] = {}
    for record_file in sorted(folder.glob(DIGESTS.format(rank="*"))):
        try:
            record = json.loads(record_file.read_text())
            files, signature = dict(record["files"]), record.get("hmac")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointTampered(f"{record_file}: unreadable digest record ({e}); the checkpoint was not loaded") from e
        expected = _signature(files)
        if expected is not None and not (signature and hmac.compare_digest(signature, expected)):
            raise CheckpointTampered(f"{record_file}: its signature does not match {KEY_ENV}; the checkpoint was not loaded")
        vouched.update(files)
    for path in sorted((folder / CHECKPOINT_TAG).rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and vouched.get(name) != _sha256(path):
            raise CheckpointTampered(f"{path}: {'differs from' if name in vouched else 'is not in'} the digests written "
                                     "when the checkpoint was saved; nothing of it was loaded. Remove the checkpoint "
                                     "or choose another scft.run")


def save_checkpoint(engine, folder: str | Path, client_state: dict[str, Any]) -> None:
    """Every rank writes its shard (and rank 0 the module) under `folder`; the frozen base is left out."""
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state=client_state, exclude_frozen_parameters=True)
    write_digests(folder, engine.global_rank)


def load_checkpoint(engine, folder: str | Path) -> dict[str, Any]:
    """Restores module, optimizer and scheduler; returns the client state saved with them."""
    verify_checkpoint(folder)
    path, client_state = engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}/{CHECKPOINT_TAG}")
    return client_state


def consolidated_checkpoint_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 trainable weights rebuilt offline from a checkpoint's ZeRO shards (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    verify_checkpoint(folder)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
