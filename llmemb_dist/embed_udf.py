"""The Ray Data side of the embedding job: a model replica per actor, and idempotent block writes.

Both run inside Ray workers; the driver (embed.py) only plans, verifies and publishes.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llmemb_dist import storage
from llmemb_dist.config import ModelConfig
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH, attribute_columns, item_attributes, render_prompt
from llmemb_dist.llm.loading import (
    ItemEncoder, load_adapter, load_backbone, load_tokenizer, node_cache_dir, resolve_model, tokenize,
)

EMBEDDING = "embedding"
# A Ray batch holds this many model batches; sorting it by prompt length before cutting it into
# model batches puts prompts of similar length together, so little compute goes to padding.
SORT_WINDOW = 8

log = logging.getLogger(__name__)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([(ITEM_ID, pa.string()), (TEXT_HASH, pa.string()), (EMBEDDING, pa.list_(pa.float32(), dim))])


def embeddings_table(item_ids: pa.Array, hashes: pa.Array, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.Table.from_arrays([item_ids, hashes, emb], schema=embeddings_schema(vectors.shape[1]))


def vectors_of(table: pa.Table) -> np.ndarray:
    """The embedding column as an (n, d) float32 array, without a copy per row."""
    col = table[EMBEDDING].combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def key_checksum(item_ids: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> int:
    """A multiset fingerprint of (item_id, text_hash) rows: the sum of 64-bit row hashes, mod 2^64.

    Sums compose across blocks, so the driver compares the output against the catalog without
    reading the output back: a missing, duplicated or altered row changes the sum (odds 2^-64).
    """
    keys = item_ids.to_pandas().astype(object) + "\x1f" + hashes.to_pandas().astype(object)
    return int(pd.util.hash_array(keys.to_numpy()).sum(dtype=np.uint64))


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
        self.encoder = ItemEncoder(backbone, model.pooling).to(device).eval()
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


def keep_rows(batch: pa.Table, ids_ref, keep: bool) -> pa.Table:
    """Rows whose item_id is (keep=True) or is not (keep=False) in the shared id array."""
    import pyarrow.compute as pc
    import ray

    mask = pc.is_in(batch[ITEM_ID], value_set=ray.get(ids_ref))
    return batch.filter(mask if keep else pc.invert(mask))


def write_block(batch: pa.Table, folder_uri: str) -> pa.Table:
    """Writes one batch as one Parquet file named by its item ids; returns (file, rows, checksum).

    The name depends only on the content, so a retried task (an actor that died, a lost
    worker) rewrites the same file instead of adding a second copy.
    """
    if batch.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64()), "checksum": pa.array([], pa.uint64())})
    ids = batch[ITEM_ID].to_pylist()
    name = f"part-{hashlib.sha256(chr(10).join(sorted(ids)).encode()).hexdigest()[:24]}.parquet"
    buf = io.BytesIO()
    pq.write_table(batch, buf)
    storage.write_bytes(storage.join(folder_uri, name), buf.getvalue())
    checksum = key_checksum(batch[ITEM_ID], batch[TEXT_HASH])
    return pa.table({"file": [name], "rows": pa.array([batch.num_rows], pa.int64()), "checksum": pa.array([checksum], pa.uint64())})
