"""The model side of the embedding job: one model replica per Ray Data actor.

It runs inside Ray workers; the driver only plans, verifies and publishes.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import pyarrow as pa
import torch

from llmemb_dist import storage
from llmemb_dist.config import ModelConfig
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH, attribute_columns, item_attributes, render_prompt
from llmemb_dist.data.embeddings import embeddings_table
from llmemb_dist.llm.loading import (
    PooledEncoder, load_adapter, load_backbone, load_tokenizer, node_cache_dir, resolve_model, tokenize,
)

# A Ray batch holds this many model batches; sorting it by prompt length before cutting it into
# model batches puts prompts of similar length together, so little compute goes to padding.
SORT_WINDOW = 8

log = logging.getLogger(__name__)


class EmbedActor:
    """One model replica; Ray Data calls it with batches of catalog rows (a class UDF on an actor pool)."""

    def __init__(
        self, model: ModelConfig, adapter_files: str | None, batch_size: int, device: str,
        num_threads: int, fault_marker: str | None,
    ):
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        source = resolve_model(model)
        self.tokenizer = load_tokenizer(source)
        backbone = load_backbone(source, model)
        if adapter_files:
            cache = node_cache_dir(model) / "adapters" / hashlib.sha256(adapter_files.encode()).hexdigest()[:16]
            # Merged into the base weights: plain Linear layers, no per-batch LoRA matmuls.
            backbone = load_adapter(backbone, storage.download_dir(adapter_files, cache)).merge_and_unload()
        self.encoder = PooledEncoder(backbone, model.pooling).to(device).eval()
        self.model, self.batch_size, self.device = model, batch_size, device
        self.fault_marker = fault_marker

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = attribute_columns(batch.schema)
        prompts = [render_prompt(self.model.instruction, item_attributes(row, columns)) for row in batch.select(columns).to_pylist()]
        order = np.argsort([len(p) for p in prompts], kind="stable")
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                enc = tokenize(self.tokenizer, [prompts[i] for i in order[start:start + self.batch_size]], self.model.max_length)
                chunks.append(self.encoder(**{k: v.to(self.device) for k, v in enc.items()}).cpu().numpy())
        vectors = np.empty((len(prompts), chunks[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(chunks)
        if self.fault_marker and _claim(self.fault_marker):  # dies with its batch computed but not returned
            log.warning("fault injection: embedding actor %d exits mid-run", os.getpid())
            os._exit(1)
        return embeddings_table(batch[ITEM_ID].combine_chunks(), batch[TEXT_HASH].combine_chunks(), vectors)


def _claim(marker: str) -> bool:
    """True for the one caller that creates `marker` (shared by all actors of a node), so the fault fires once."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
