"""The embeddings table contract: `item_id`, `text_hash`, `embedding: fixed_size_list<float32>[d]`.

Written by the embedding stage, read by RAT, the recommender and the benchmarks (`load_llm_table`); pandas, DuckDB and Spark read it as is.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH

EMBEDDING = "embedding"
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


def load_llm_table(uri: str, item_ids: list[str], expected_dim: int = 0) -> np.ndarray:
    """The LLM embedding of every catalog item, row k - 1 for item k; a gap or a wrong dimension is an error."""
    table = storage.read_table(uri, "embeddings")
    if ITEM_ID not in table.column_names or "embedding" not in table.column_names:
        raise storage.DataError(f"{uri}: table 'embeddings' needs columns item_id and embedding, has {table.column_names}")
    emb_type = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(emb_type):
        raise storage.DataError(f"{uri}: field 'embedding' must be fixed_size_list<float32>[d], is {emb_type}")
    dim = emb_type.list_size
    if expected_dim and dim != expected_dim:
        raise storage.DataError(f"{uri}: field 'embedding' has dimension {dim}, config rat.embedding_dim says {expected_dim}")
    ids = table.column(ITEM_ID).combine_chunks()
    if pc.count_distinct(ids).as_py() != len(ids):
        raise storage.DataError(f"{uri}: item_id is not unique in table 'embeddings'")
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.astype(np.float32).reshape(len(ids), dim)
    wanted = pa.array(item_ids, ids.type)
    row = pc.index_in(wanted, value_set=ids)
    if row.null_count:
        missing = wanted.filter(row.is_null()).to_pylist()
        raise storage.DataError(
            f"{uri}: {len(missing)} of {len(item_ids)} catalog items have no embedding (first: {missing[:5]}); "
            "re-run the embedding stage for this catalog"
        )
    if len(ids) > len(item_ids):
        log.info("%s: %d embedded items are not in the catalog; ignored", uri, len(ids) - len(item_ids))
    return vectors[row.to_numpy(zero_copy_only=False)]
