"""An index publication's files: the FAISS index (its own binary format, plain data that reading runs no
code of) and, as a Parquet table beside it, each item of the adapted version in its order with the label
the index holds its vector under. Labels outlive a version (an updated index keeps an item's label), so
they are not row positions; `label_rows` turns them back into rows."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmemb_dist import storage
from llmemb_dist.data.catalog import ITEM_ID

FOLDER, FILE, IDS, LABEL = "faiss", "index.faiss", "item_ids", "label"


def write(pub: storage.Publication, index, labels: np.ndarray, item_ids: list[str]) -> None:
    """Adds the index and its table (item_ids[k] is held under labels[k]) to a publication being written."""
    import faiss

    with tempfile.TemporaryDirectory() as d:
        faiss.write_index(index, str(Path(d) / FILE))
        pub.upload_dir(d, FOLDER)
    pub.write_table(IDS, pa.table({ITEM_ID: pa.array(item_ids, pa.string()), LABEL: pa.array(labels, pa.int64())}))


def read(uri: str, manifest: dict | None = None) -> tuple[object, np.ndarray, list[str]]:
    """The published index, the label of each item and the items, in the adapted version's order."""
    import faiss

    manifest = manifest or storage.read_manifest(uri)
    data = storage.read_bytes(storage.join(storage.data_uri(uri, manifest), FOLDER, FILE))
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    table = storage.read_parquet_files(storage.table_files(uri, IDS, manifest))
    item_ids = table.column(ITEM_ID).to_pylist()
    # Published before labels outlived a version: label k is row k.
    labels = table.column(LABEL).to_numpy() if LABEL in table.column_names else np.arange(len(item_ids))
    if index.ntotal != len(item_ids):
        raise storage.DataError(f"{uri}: the index holds {index.ntotal} vectors but table {IDS!r} {len(item_ids)} ids")
    if len(labels) and (labels.min() < 0 or len(np.unique(labels)) != len(labels)):
        raise storage.DataError(f"{uri}: table {IDS!r} column {LABEL!r} holds a negative or repeated label")
    return index, labels, item_ids


def label_rows(labels: np.ndarray) -> np.ndarray:
    """The row of each label, indexed by label (-1 where no row has it), for labels as `read` gives them."""
    rows = np.full(int(labels.max()) + 1 if len(labels) else 0, -1, dtype=np.int64)
    rows[labels] = np.arange(len(labels))
    return rows


def rows_of(found: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`found` labels (a search's, -1 where it found fewer) as rows through `label_rows`' array."""
    return np.where(found >= 0, rows[np.maximum(found, 0)], -1)
