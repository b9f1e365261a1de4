"""The SCFT model: the LoRA item encoder, the learnable temperature and the contrastive loss in one
module, and the DeepSpeed engine settings it trains under."""
from __future__ import annotations

import json
from typing import Any

import torch
import yaml
from torch import nn

from llmemb_dist import storage
from llmemb_dist.config import Config, ConfigError
from llmemb_dist.distributed import engine as ds_engine
from llmemb_dist.llm import losses
from llmemb_dist.llm.loading import PooledEncoder, attach_lora, load_backbone, load_tokenizer, resolve_model


class ContrastiveModel(nn.Module):
    """The item encoder, the learnable temperature and the loss in one module.

    One module, so DeepSpeed optimises the temperature with the LoRA weights and, under
    ZeRO-3, gathers both when the forward runs.
    """

    def __init__(self, encoder: PooledEncoder, loss: str, temperature: losses.Temperature, gather: bool):
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


def build_contrastive_model(cfg: Config, spec: ds_engine.EngineSpec) -> tuple[ContrastiveModel, Any]:
    """The model with LoRA attached (built partitioned when `spec` is ZeRO-3) and its tokenizer."""
    source = resolve_model(cfg.model)
    torch.manual_seed(cfg.scft.seed)  # identical LoRA init on every rank
    with ds_engine.model_init_context(spec):
        encoder = PooledEncoder(attach_lora(load_backbone(source, cfg.model), cfg.model.lora), cfg.model.pooling)
    s = cfg.scft
    temperature = losses.Temperature(s.temperature_init, s.temperature_min, s.temperature_max)
    return ContrastiveModel(encoder, s.loss, temperature, s.gather_negatives), load_tokenizer(source)


def engine_spec(cfg: Config) -> ds_engine.EngineSpec:
    """The one place the SCFT config becomes DeepSpeed settings. The driver makes it once a run and hands
    it to the workers: the user's fragment (scft.deepspeed, maybe remote) is read and checked once."""
    s = cfg.scft
    return ds_engine.EngineSpec(
        zero_stage=s.zero_stage, dtype=cfg.model.dtype, micro_batch=s.batch_size, lr=s.lr,
        weight_decay=s.weight_decay, warmup_steps=s.warmup_steps, offload_optimizer=s.offload_optimizer,
        use_gpu=s.use_gpu, grad_accumulation=s.grad_accumulation, user_config=json.dumps(user_deepspeed_config(cfg)),
    )


def user_deepspeed_config(cfg: Config) -> dict:
    """The user's DeepSpeed fragment (scft.deepspeed), checked: a mapping that sets none of our keys."""
    if not cfg.scft.deepspeed:
        return {}
    source = cfg.scft.deepspeed
    try:
        fragment = yaml.safe_load(storage.read_bytes(source).decode())  # JSON is YAML too
    except (FileNotFoundError, storage.StorageError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"scft.deepspeed: cannot read {source} as JSON or YAML ({e})") from None
    if not isinstance(fragment, dict):
        raise ConfigError(f"scft.deepspeed: {source} must hold a mapping of DeepSpeed settings")
    try:
        ds_engine.check_user_config(fragment, source)
    except ValueError as e:
        raise ConfigError(f"scft.deepspeed: {e}") from None
    return fragment
