"""The adapt transform on a Ray Data actor: one ItemPlacement per actor, blocks of embeddings in, blocks out."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pyarrow as pa

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH
from llmemb_dist.data.embeddings import embeddings_table, vectors_of
from llmemb_dist.srs.placement import ItemPlacement


class PlaceActor:
    """Loads the RAT publication's placement once; Ray Data calls it with blocks of an embeddings version."""

    def __init__(self, placement_uri: str, num_threads: int):
        import torch

        torch.set_num_threads(max(1, num_threads))
        local = Path(tempfile.gettempdir()) / "llmemb-placements" / hashlib.sha256(placement_uri.encode()).hexdigest()[:16]
        self.placement = ItemPlacement.load(storage.download_dir(placement_uri, local))

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, hashes = batch[ITEM_ID].combine_chunks(), batch[TEXT_HASH].combine_chunks()
        vectors = self.placement.vectors(ids.to_pylist(), hashes.to_pylist(), vectors_of(batch))
        return embeddings_table(ids, hashes, vectors)
