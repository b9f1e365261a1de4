"""Typed run configuration: dataclasses loaded from YAML, overridable with key=value.

One config file describes every stage, so the pipeline and each launch script
read the same object and a stage's config hash says exactly what it depends on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class DatasetConfig:
    name: str = "ml-100k"
    # recbole: atomic .inter/.item files; movielens_csv: GroupLens CSV; amazon: review + meta JSON lines
    format: Literal["recbole", "movielens_csv", "amazon"] = "recbole"
    # A folder (or for amazon the reviews file); "recbole:<name>" means the example shipped in the recbole wheel.
    source: str = "recbole:ml-100k"
    metadata: str = ""  # amazon only: the metadata JSON lines file
    attributes: list[str] = field(default_factory=list)  # item columns kept as attributes; empty = all
    k_core: int = 0  # iterative: every user and item keeps at least k interactions; 0 = off
    min_seq_len: int = 0  # users with fewer events are dropped (after k-core)
    max_seq_len: int = 0  # keep each user's most recent events; 0 = no limit
    max_attr_chars: int = 0  # attribute values are cut to this many characters; 0 = no cut
    max_items: int = 0  # keep only the most popular items (a small slice for tests); 0 = all
    num_shards: int = 4


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    # "auto" picks the attention/MLP projections the model has (Llama: q,k,v,o,gate,up,down; BERT: query,key,value,dense).
    target_modules: list[str] = field(default_factory=lambda: ["auto"])


@dataclass
class ModelConfig:
    # A Hugging Face folder, a storage URI of one, a .gguf file, or a model a package ships: "minilm", "smollm2".
    path: str = "minilm"
    gguf_file: str = ""  # file name inside `path` when `path` is a folder holding GGUF files
    pooling: Literal["mean", "last"] = "mean"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_length: int = 128
    instruction: str = "The item information is given as follows. Compress it into one embedding:"
    gradient_checkpointing: bool = False
    cache_dir: str = "~/.cache/llmemb_dist/models"  # per-node copy of models fetched from storage
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ScftConfig:
    run: str = "default"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    batch_size: int = 16  # items per worker per step; each item gives two views
    steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    drop_ratio: float = 0.4
    augmentation: Literal["fresh", "reference"] = "fresh"
    loss: Literal["infonce", "reference"] = "infonce"
    temperature_init: float = 0.05
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    gather_negatives: bool = True
    checkpoint_every: int = 50
    max_failures: int = 2
    fail_at_step: int = -1  # fault injection: worker rank 0 raises once at this step; -1 = off
    log_every: int = 1
    seed: int = 42


@dataclass
class EmbedConfig:
    version: str = "default"
    # "auto": the adapter of scft.run if it is published, else the bare base model; "none": bare base model; or a URI.
    adapter: str = "auto"
    batch_size: int = 64
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    pca_dim: int = 0  # 0 = keep the model's dimension
    incremental_from: str = ""  # a previous version to reuse unchanged items from
    fail_actor_once: bool = False  # fault injection: one actor dies once mid-run
    rows_per_file: int = 100_000  # rows per output Parquet file


@dataclass
class EvalConfig:
    num_negatives: int = 100
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    head_fraction: float = 0.2  # the most popular items (by training interactions) that count as head
    short_user_max_len: int = 10  # users with at most this many training events are "short"
    seed: int = 42
    select_protocol: Literal["sampled", "full"] = "sampled"  # which validation NDCG@10 early stopping watches


@dataclass
class RatConfig:
    run: str = "default"
    embeddings: str = "default"  # an embeddings version under <root>/embeddings, or a URI
    embedding_dim: int = 0  # expected LLM embedding dimension; 0 = take it from the embeddings
    backbone: Literal["sasrec", "bert4rec", "gru4rec"] = "sasrec"
    # llm_id: adapted LLM vector + ID vector; llm_frozen: PCA of the LLM table, nothing trained (srs/items.py)
    item_repr: Literal["id", "llm", "llm_id", "llm_frozen"] = "llm"
    hidden: int = 128
    layers: int = 2
    heads: int = 1
    dropout: float = 0.5
    max_len: int = 200
    adapter_hidden: int = 768
    alpha: float = 0.01
    align_temperature: float = 2.0
    mask_prob: float = 0.6  # Bert4Rec
    batch_size: int = 128
    lr: float = 1e-3
    epochs: int = 200
    patience: int = 20
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    seed: int = 42
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RayConfig:
    address: str = ""  # empty: $RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int = 0  # embedded Ray only; 0 = all cores


@dataclass
class Config:
    root: str = "./runs"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scft: ScftConfig = field(default_factory=ScftConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    rat: RatConfig = field(default_factory=RatConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config, applies `dotted.key=value` overrides, and type-checks every key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else "")
    return _build(Config, raw, prefix="")


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """`<config.yaml> [key=value ...]`: the config path is the first argument without '='."""
    paths = [a for a in argv if "=" not in a]
    if len(paths) > 1:
        raise ConfigError(f"expected one config file, got {paths}")
    return (paths[0] if paths else None), [a for a in argv if "=" in a]


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(section: Any) -> str:
    """A stable hash of a config (section); equal hashes mean an equal run."""
    data = json.dumps(dataclasses.asdict(section), sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<top>'!r} must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key {key!r} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key {key!r} must be null")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run=7` on a command line is a name, not a number
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
