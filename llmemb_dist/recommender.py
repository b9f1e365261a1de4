"""A RAT publication as a recommender: its trained backbone over RAT's items or an adapted version's, scoring
by inner product (the text channel's columns included), answering top-k by a full scan or through an
index publication. Below the stages, so that the index stage and the serving app build on it.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from llmemb_dist import storage
from llmemb_dist.config import RatConfig
from llmemb_dist.data import index_files
from llmemb_dist.data.catalog import ITEM_ID
from llmemb_dist.data.embeddings import load_llm_table, vectors_of

# The table that holds item vectors, by kind of publication: embeddings, adapted, RAT's result.
EMBEDDING_TABLES = ("embeddings", "item_embeddings")


def read_embeddings(uri: str, manifest: dict[str, Any] | None = None) -> pa.Table:
    """The item vectors of an embeddings, adapted or RAT publication: item_id, text_hash, embedding.
    `manifest`: the one a caller already read, so the vectors are of the version it read the rest from."""
    manifest = manifest or storage.read_manifest(uri)
    found = [name for name in EMBEDDING_TABLES if name in manifest["tables"]]
    if not found:
        raise storage.DataError(f"{uri}: a {manifest.get('kind')!r} publication holds no item vectors "
                                f"(its tables: {sorted(manifest['tables'])})")
    return storage.read_parquet_files(storage.table_files(uri, found[0], manifest))


class Recommender:
    """A trained RAT recommender for serving: scores and top-k over an item table for a user's history.

    The item table is RAT's own (the items it trained on) or, with `items=`, an adapted publication:
    every item of a catalog version, new ones placed by the adapt stage, ranked like the rest. With
    `index=`, an index publication over that adapted version answers `top_k` instead of a full scan.
    """

    def __init__(self, model, item_ids: list[str], table: torch.Tensor, max_len: int, text: torch.Tensor | None = None,
                 index=None, labels: np.ndarray | None = None):
        """`text`: the items' LLM vectors (row k for item_ids[k]), for a model whose text channel is on;
        `index`: a faiss index over `item_vectors` by inner product, holding item_ids[k] under label
        `labels[k]` (by default k)."""
        self.model, self.item_ids, self.max_len, self.index = model.eval(), item_ids, max_len, index
        self.index_rows = None if index is None else index_files.label_rows(
            np.arange(len(item_ids)) if labels is None else labels)
        self.row = {item: k + 1 for k, item in enumerate(item_ids)}
        self.table = torch.cat([torch.zeros(1, table.shape[1]), table])  # row 0 is padding
        self.model.over_items(self.table)
        if self.model.text_weight:
            if text is None:
                raise ValueError("this model's text channel is on (text_weight > 0): give the items' LLM vectors")
            self.model.attach_text(text)
        self.item_vectors = self.model.item_vectors()

    @classmethod
    def from_publication(cls, uri: str, items: str | None = None, index: str | None = None) -> "Recommender":
        """`index`: an index publication made over this RAT result's adapted version `items` (by default the
        one it names); any other is refused, since its vectors would not be this recommender's."""
        from safetensors.torch import load

        index_manifest = index and storage.read_manifest(index)
        if index_manifest:
            items = items or index_manifest.get("inputs", {}).get("adapted", {}).get("uri")
            _check_index(index, index_manifest, uri, items)

        from llmemb_dist.srs import build_model

        manifest = storage.read_manifest(uri)  # once: the model and its items from one version
        data = storage.data_uri(uri, manifest)
        spec = json.loads(storage.read_bytes(storage.join(data, "model", "model_config.json")))
        state = load(storage.read_bytes(storage.join(data, "model", "model.safetensors")))
        rcfg = RatConfig(hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"], max_len=spec["max_len"])
        # The backbone alone: the item side is the published table, whatever representation trained it.
        model = build_model(rcfg, spec["backbone"], "id", spec["num_items"])
        backbone = {k: v for k, v in state.items() if not k.startswith("items.")}
        missing = [k for k in model.load_state_dict(backbone, strict=False).missing_keys if not k.startswith("items.")]
        if missing:
            raise storage.DataError(f"{uri}: the published model lacks {missing[0]!r}")
        model.text_weight = spec.get("text_weight", 0.0)  # published before the text channel: none
        vectors = read_embeddings(items) if items else read_embeddings(uri, manifest)
        item_ids = vectors.column(ITEM_ID).to_pylist()
        text = None
        if model.text_weight:
            source = spec["embeddings"] if items is None else _embeddings_input(items)
            text = torch.from_numpy(load_llm_table(source, item_ids))
        faiss_index = labels = None
        if index_manifest:
            faiss_index, labels, indexed = index_files.read(index, index_manifest)
            if indexed != item_ids:
                raise storage.DataError(f"{index}: its items are not the items of {items} in their order")
        # A copy: the Arrow buffer behind vectors_of is read-only.
        return cls(model, item_ids, torch.tensor(vectors_of(vectors)), spec["max_len"], text, faiss_index, labels)

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(len(histories), d) float32: the vector each user (a history, oldest first) is scored with; a dot
        product with a row of `item_vectors` is that item's score."""
        unknown = [item for history in histories for item in history if item not in self.row]
        if unknown:
            raise ValueError(f"item {unknown[0]!r} of the history is not in this recommender's item table")
        recent = [history[-self.max_len:] for history in histories]
        rows = torch.zeros(len(recent), max(map(len, recent)), dtype=torch.long)  # left-padded
        for u, history in enumerate(recent):
            rows[u, rows.shape[1] - len(history):] = torch.tensor([self.row[item] for item in history])
        return self.model.user_vectors(rows).numpy()

    def scores(self, history: Sequence[str]) -> np.ndarray:
        """One score per item of `item_ids` for the user who interacted with `history` (oldest first)."""
        return self.user_vectors([history])[0] @ self.item_vectors[1:].numpy().T

    def top_k(self, history: Sequence[str], k: int = 10, exclude_history: bool = True) -> list[tuple[str, float]]:
        """The `k` best items as (item_id, score), best first; items of the history left out by default."""
        rows, scores = self._nearest(history, k + len(set(history)) if exclude_history else k)
        excluded = {self.row[item] - 1 for item in history} if exclude_history else set()
        best = [(self.item_ids[i], float(s)) for i, s in zip(rows, scores)
                if i >= 0 and i not in excluded and np.isfinite(s)]
        return best[:k]

    def _nearest(self, history: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` best rows of `item_ids` and their scores, best first: through the index, else by scoring
        every item."""
        if self.index is not None:
            scores, labels = self.index.search(self.user_vectors([history]), min(n, len(self.item_ids)))
            return index_files.rows_of(labels[0], self.index_rows), scores[0]
        scores = self.scores(history)
        best = np.argsort(-scores, kind="stable")[:n]
        return best, scores[best]


def _check_index(index: str, manifest: dict, rat_uri: str, items: str | None) -> None:
    """An index answers for a recommender only over the very publications it was built from."""
    inputs = manifest.get("inputs", {})
    if manifest.get("kind") != "index" or "adapted" not in inputs or "rat" not in inputs:
        raise storage.DataError(f"{index}: not an index publication (its kind is {manifest.get('kind')!r})")
    for what, uri, built in (("RAT result", rat_uri, inputs["rat"]), ("adapted version", items, inputs["adapted"])):
        if storage.read_manifest(uri)["data_dir"] != built["data_dir"]:
            raise storage.DataError(f"{index}: built over the {what} {built['uri']} ({built['data_dir']}), "
                                    f"not this recommender's {uri}")


def _embeddings_input(uri: str) -> str:
    """The LLM embeddings publication an adapted publication was made from."""
    embeddings = storage.read_manifest(uri).get("inputs", {}).get("embeddings")
    if not isinstance(embeddings, dict) or not embeddings.get("uri"):
        raise storage.DataError(f"{uri}: not an adapted publication (it names no embeddings input)")
    return embeddings["uri"]
