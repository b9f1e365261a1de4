"""RAT's inputs: the users' sequences of the published dataset and the LLM table of an embeddings version."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from llmemb_dist import layout, storage
from llmemb_dist.config import Config
from llmemb_dist.data.catalog import ITEM_ID
from llmemb_dist.data.sequences import Sequences, build_sequences

log = logging.getLogger(__name__)


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
    ids = table.column(ITEM_ID).to_pylist()
    if len(set(ids)) != len(ids):
        raise storage.DataError(f"{uri}: item_id is not unique in table 'embeddings'")
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.astype(np.float32).reshape(len(ids), dim)
    row = {item: i for i, item in enumerate(ids)}
    missing = [item for item in item_ids if item not in row]
    if missing:
        raise storage.DataError(
            f"{uri}: {len(missing)} of {len(item_ids)} catalog items have no embedding (first: {missing[:5]}); "
            "re-run the embedding stage for this catalog"
        )
    if len(ids) > len(item_ids):
        log.info("%s: %d embedded items are not in the catalog; ignored", uri, len(ids) - len(item_ids))
    return vectors[[row[item] for item in item_ids]]


def load_sequences(cfg: Config) -> Sequences:
    uri = layout.dataset_uri(cfg)
    catalog = storage.read_table(uri, "catalog")
    return build_sequences(storage.read_table(uri, "interactions"), catalog.column(ITEM_ID).to_pylist(), f"{uri}/interactions")
