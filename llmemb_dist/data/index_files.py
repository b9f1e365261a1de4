"""An index publication's files: the FAISS index (its own binary format, plain data that reading runs no
code of) and the item id of each of its labels, as a Parquet table beside it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID

FOLDER, FILE, IDS = "faiss", "index.faiss", "item_ids"


def write(pub: storage.Publication, index, item_ids: list[str]) -> None:
    """Adds the index and its labels' item ids to a publication being written."""
    import faiss

    with tempfile.TemporaryDirectory() as d:
        faiss.write_index(index, str(Path(d) / FILE))
        pub.upload_dir(d, FOLDER)
    pub.write_table(IDS, pa.table({ITEM_ID: pa.array(item_ids, pa.string())}))


def read(uri: str, manifest: dict | None = None) -> tuple[object, list[str]]:
    """The published index and the item id of each label."""
    import faiss

    manifest = manifest or storage.read_manifest(uri)
    data = storage.read_bytes(storage.join(storage.data_uri(uri, manifest), FOLDER, FILE))
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    item_ids = storage.read_parquet_files(storage.table_files(uri, IDS, manifest)).column(ITEM_ID).to_pylist()
    if index.ntotal != len(item_ids):
        raise storage.DataError(f"{uri}: the index holds {index.ntotal} vectors but table {IDS!r} {len(item_ids)} ids")
    return index, item_ids
