"""Reading Parquet files of a publication with Ray Data, whole or as narrow key columns."""
from __future__ import annotations

import pyarrow as pa

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH


def read(uris: list[str], columns: list[str] | None = None, min_blocks: int = 0):
    import ray

    fs, _ = storage.resolve(uris[0])
    blocks = {"override_num_blocks": max(len(uris), min_blocks)} if min_blocks else {}
    return ray.data.read_parquet([storage.resolve(u)[1] for u in uris], filesystem=fs, columns=columns, **blocks)


def read_keys(files: list[str]) -> pa.Table:
    """The (item_id, text_hash) columns only; read by Ray workers, gathered on the driver."""
    import ray

    tables = ray.get(read(files, columns=[ITEM_ID, TEXT_HASH]).to_arrow_refs())
    return pa.concat_tables([t.select([ITEM_ID, TEXT_HASH]) for t in tables]).combine_chunks()
