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
    PooledEncoder, load_adapter, load_backbone, load_tokenizer, node_cache_dir, resolve_model,
)

# A Ray batch holds this many model batches; sorting it by length before cutting it into model batches
# puts prompts of similar length together, so little compute goes to padding.
SORT_WINDOW = 8
INPUT_IDS = "input_ids"  # the token ids `PromptTokenizer` hands the model actor, one list<int32> per item

log = logging.getLogger(__name__)


class PromptTokenizer:
    """Catalog rows as (item_id, text_hash, input_ids): the prompt of each item, tokenized and truncated.

    In the job, an actor of its own beside each model actor, so that rendering prompts and tokenizing run
    while the model computes instead of in front of each forward pass. An actor, not tasks: Ray Data hands
    an actor its next batch at once, where each task would first wait to be scheduled."""

    def __init__(self, model: ModelConfig):
        self.model = model
        self.tokenizer = load_tokenizer(resolve_model(model))

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = attribute_columns(batch.schema)
        prompts = [render_prompt(self.model.instruction, item_attributes(row, columns))
                   for row in batch.select(columns).to_pylist()]
        ids = self.tokenizer(prompts, truncation=True, max_length=self.model.max_length)["input_ids"]
        return pa.table({ITEM_ID: batch[ITEM_ID], TEXT_HASH: batch[TEXT_HASH], INPUT_IDS: pa.array(ids, pa.list_(pa.int32()))})


class EmbedActor:
    """One model replica; Ray Data calls it with batches of `PromptTokenizer` rows (a class UDF on an actor pool)."""

    def __init__(
        self, model: ModelConfig, adapter_files: str | None, batch_size: int, device: str,
        num_threads: int, fault_marker: str | None,
    ):
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        source = resolve_model(model)
        self.tokenize = PromptTokenizer(model)
        self.pad_id = self.tokenize.tokenizer.pad_token_id
        backbone = load_backbone(source, model)
        if adapter_files:
            cache = node_cache_dir(model) / "adapters" / hashlib.sha256(adapter_files.encode()).hexdigest()[:16]
            # Merged into the base weights: plain Linear layers, no per-batch LoRA matmuls.
            backbone = load_adapter(backbone, storage.download_dir(adapter_files, cache)).merge_and_unload()
        self.encoder = PooledEncoder(backbone, model.pooling).to(device).eval()
        self.batch_size, self.device = batch_size, device
        self.fault_marker = fault_marker

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch[INPUT_IDS].combine_chunks()
        offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
        lengths = np.diff(offsets)
        order = np.argsort(lengths, kind="stable")
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                # Right-padded as the tokenizer pads: `last` pooling finds the last real token from the mask.
                mask = np.arange(lengths[rows].max()) < lengths[rows, None]
                input_ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
                input_ids[mask] = np.concatenate([values[offsets[k]:offsets[k + 1]] for k in rows])
                chunks.append(self.encoder(input_ids=torch.from_numpy(input_ids).to(self.device),
                                           attention_mask=torch.from_numpy(mask.astype(np.int64)).to(self.device)).cpu().numpy())
        vectors = np.empty((len(order), chunks[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(chunks)
        if self.fault_marker and _claim(self.fault_marker):  # dies with its batch computed but not returned
            log.warning("fault injection: embedding actor %d exits mid-run", os.getpid())
            os._exit(1)
        return embeddings_table(batch[ITEM_ID].combine_chunks(), batch[TEXT_HASH].combine_chunks(), vectors)

    def embed_catalog(self, catalog: pa.Table) -> pa.Table:
        """The job's two steps in one process: catalog rows to their embeddings."""
        return self(self.tokenize(catalog))


def _claim(marker: str) -> bool:
    """True for the one caller that creates `marker` (shared by all actors of a node), so the fault fires once."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
