"""The embeddings table contract: `item_id`, `text_hash`, `embedding: fixed_size_list<float32>[d]`.

Written by the embedding stage, read by RAT and the benchmarks; pandas, DuckDB and Spark read it as is.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH

EMBEDDING = "embedding"


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
