"""What an embedding run must do: the adapter and encoder it embeds with, the catalog's keys, and in
incremental mode which items it carries over from a previous version."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from llmemb_dist import layout, storage, versions
from llmemb_dist.blockio import CarryOver, Keys, table_keys
from llmemb_dist.config import Config, ConfigError
from llmemb_dist.data.catalog import text_hash
from llmemb_dist.llm.loading import ModelSource
from llmemb_dist.stages.embed import pca as embed_pca

log = logging.getLogger(__name__)
EMPTY_TEXT_HASH = text_hash([])  # the hash of an item with every attribute empty
EMBEDDINGS = versions.Table(stage="embed", kind="embeddings", name="embeddings", what="embeddings",
                            uri=layout.embeddings_uri)


@dataclass
class Plan:
    """What this run embeds, and what it carries over from a previous version."""

    catalog_files: list[str]
    keys: Keys  # of the whole catalog
    previous: versions.Previous | None = None

    @property
    def carry(self) -> CarryOver | None:
        return self.previous and self.previous.carry

    @property
    def reused(self) -> int:
        return 0 if self.carry is None else self.carry.reused

    @property
    def removed(self) -> int:
        return 0 if self.carry is None else self.carry.removed

    @property
    def new(self) -> int:
        return self.keys.rows - self.reused


def resolve_adapter(cfg: Config, base: dict) -> tuple[str, dict] | None:
    """(URI, manifest) of the adapter to use, or None for the bare base model."""
    choice = cfg.embed.adapter
    if choice == "none":
        return None
    uri = layout.adapter_uri(cfg) if choice == "auto" else choice
    if choice == "auto" and not storage.is_published(uri):
        log.warning("no published SCFT adapter at %s: embedding with the bare base model (the no-SCFT baseline)", uri)
        return None
    manifest = storage.read_manifest(uri)
    trained_on = manifest.get("base_model") or {}
    if trained_on.get("fingerprint") != base["fingerprint"]:
        raise ConfigError(
            f"embed.adapter: the adapter at {uri} was trained on base model {trained_on.get('path')!r} "
            f"(fingerprint {trained_on.get('fingerprint')}), but model.path is {base['path']!r} "
            f"(fingerprint {base['fingerprint']})"
        )
    return uri, manifest


def encoder_identity(cfg: Config, base: dict, adapter: tuple[str, dict] | None) -> str:
    """A hash of everything that decides an item's vector besides its attribute text (text_hash)."""
    m = cfg.model
    parts = {
        "base": base["fingerprint"], "pooling": m.pooling, "dtype": m.dtype, "max_length": m.max_length,
        "instruction": m.instruction, "adapter": adapter and [adapter[1]["data_dir"], adapter[1]["config_hash"]],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def hidden_size(source: ModelSource) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.folder, **source.from_pretrained_kwargs())
    return int(config.hidden_size)


def make_plan(cfg: Config, data_uri: str, data_manifest: dict, dim: int, encoder: str) -> Plan:
    if data_manifest["tables"].get("catalog", {}).get("rows", 0) == 0:
        raise storage.DataError(f"{data_uri}: the catalog is empty: nothing to embed")
    files = storage.table_files(data_uri, "catalog", data_manifest)
    keys = table_keys(files, blank_hash=EMPTY_TEXT_HASH, lookups=bool(cfg.embed.incremental_from))
    if keys.blank is not None:
        raise storage.DataError(f"{data_uri} (catalog): item {keys.blank!r} has every attribute empty: nothing to embed")

    def reusable(prev_uri: str, prev: dict) -> bool:
        if prev["dim"] != dim:
            raise storage.DataError(
                f"{prev_uri}: the previous version has dimension {prev['dim']}, this run gives {dim} "
                f"(embed.pca_dim={cfg.embed.pca_dim}); incremental mode needs equal dimensions: run a full embedding"
            )
        if prev.get("encoder") != encoder:
            # A scheduled re-embedding after a new SCFT adapter lands here: embed everything, do not fail.
            log.warning("%s was embedded with another model, adapter or prompt: no vector can be reused, "
                        "embedding every item", prev_uri)
            return False
        return True

    return Plan(catalog_files=files, keys=keys, previous=versions.previous_version(cfg, EMBEDDINGS, keys, reusable))


def previous_pca(previous: versions.Previous) -> dict | None:
    if not previous.manifest.get("pca"):
        return None
    return embed_pca.from_bytes(storage.read_bytes(storage.join(storage.data_uri(previous.uri, previous.manifest), embed_pca.PCA_FILE)))
