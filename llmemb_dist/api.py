"""The public Python API: what the stages publish, used from Python without knowing the storage layout.

    from llmemb_dist.api import ItemEncoder, Recommender, read_embeddings

    table = read_embeddings("runs/embeddings/default")          # pyarrow.Table: item_id, text_hash, embedding
    encoder = ItemEncoder.from_publication("runs/embeddings/default")
    vectors = encoder.encode([{"movie_title": "Arrival", "release_year": "2016", "class": "Drama Sci-Fi"}])
    rec = Recommender.from_publication("runs/rat/default/result", items="runs/adapted/today")
    rec.top_k(["50", "172", "181"], k=10)                     # [(item_id, score), ...]
    fast = Recommender.from_publication("runs/rat/default/result", index="runs/index/default")  # top_k via FAISS

Every function takes a publication's URI (a local folder or s3://...) and reads it through its manifest,
so it sees exactly what was committed.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from llmemb_dist import storage
from llmemb_dist.config import config_from_dict
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH, attribute_columns
from llmemb_dist.data.embeddings import vectors_of
from llmemb_dist.recommender import Recommender, read_embeddings


class ItemEncoder:
    """Embeds items exactly as an embeddings version was made: its base model, SCFT adapter (merged),
    prompt, pooling, maximum length and PCA, through the embedding job's own actor code."""

    def __init__(self, actor, attributes: list[str], pca: dict[str, np.ndarray] | None):
        self.actor, self.attributes, self.pca = actor, attributes, pca

    @classmethod
    def from_publication(cls, uri: str, device: str = "cpu", num_threads: int = 0) -> "ItemEncoder":
        from llmemb_dist.llm.loading import base_model_info, resolve_model
        from llmemb_dist.stages.embed import pca as embed_pca
        from llmemb_dist.stages.embed.actor import EmbedActor
        from llmemb_dist.stages.embed.plan import encoder_identity

        manifest = storage.read_manifest(uri)
        if manifest.get("kind") != "embeddings":
            raise storage.DataError(f"{uri}: an ItemEncoder needs an embeddings publication, this is {manifest.get('kind')!r}")
        cfg = config_from_dict(manifest["config"])
        base = base_model_info(resolve_model(cfg.model), cfg.model)
        adapter = manifest.get("adapter")
        adapter_manifest = adapter and storage.read_manifest(adapter["uri"])
        # The same identity the embedding job recorded: else this encoder would make other vectors.
        if encoder_identity(cfg, base, adapter and (adapter["uri"], adapter_manifest)) != manifest.get("encoder"):
            raise storage.DataError(f"{uri}: its base model ({cfg.model.path}) or SCFT adapter "
                                    f"({adapter and adapter['uri']}) has changed since it was embedded")
        adapter_files = adapter and storage.join(storage.data_uri(adapter["uri"], adapter_manifest), "adapter")
        actor = EmbedActor(cfg.model, adapter_files, batch_size=cfg.embed.batch_size, device=device,
                           num_threads=num_threads or torch.get_num_threads(), fault_marker=None)
        catalog = storage.table_files(manifest["catalog"]["uri"], "catalog")[0]
        attributes = attribute_columns(storage.read_schema(catalog))
        pca = embed_pca.from_bytes(storage.read_bytes(storage.join(storage.data_uri(uri, manifest), embed_pca.PCA_FILE))) \
            if manifest.get("pca") else None
        return cls(actor, attributes, pca)

    def encode(self, items: Iterable[dict[str, Any]]) -> np.ndarray:
        """(n, d) float32: one vector per item, given as {attribute: value} with the catalog's attribute
        names (values as the catalog holds them; a missing attribute is empty)."""
        items = list(items)
        unknown = sorted({key for item in items for key in item} - set(self.attributes))
        if unknown:
            raise ValueError(f"unknown attribute {unknown[0]!r}: this catalog's attributes are {self.attributes}")
        columns = {ITEM_ID: pa.array([str(k) for k in range(len(items))], pa.string())}
        columns |= {a: pa.array([None if item.get(a) is None else str(item[a]) for item in items], pa.string())
                    for a in self.attributes}
        columns[TEXT_HASH] = pa.array([""] * len(items), pa.string())
        vectors = vectors_of(self.actor.embed_catalog(pa.table(columns)))
        return vectors if self.pca is None else (vectors - self.pca["mean"]) @ self.pca["components"].T


__all__ = ["ItemEncoder", "Recommender", "read_embeddings"]
