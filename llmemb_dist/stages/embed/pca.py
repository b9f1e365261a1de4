"""PCA of catalog embeddings, fitted in one streaming pass and stored with the embeddings version.

Each block contributes its row count, column sums and Gram matrix (d x d, float64); the cluster adds
them up in a tree (`add_moments`), so neither the fit nor the driver holds more than one block's worth:
the driver receives one d x d matrix, whatever the number of blocks.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH
from llmemb_dist.data.embeddings import embeddings_table, vectors_of

PCA_FILE = "pca.npz"


def block_moments(batch: pa.Table) -> pa.Table:
    x = vectors_of(batch).astype(np.float64)
    return pa.table({"n": [len(x)], "sum": [x.sum(0).tobytes()], "gram": [(x.T @ x).tobytes()]})


def add_moments(*tables: pa.Table) -> pa.Table:
    """The moments of every row of `tables` (rows of `block_moments`), summed into one row."""
    rows = [row for table in tables for row in table.to_pylist()]
    total = sum(np.frombuffer(r["sum"]) for r in rows)
    gram = sum(np.frombuffer(r["gram"]) for r in rows)
    return pa.table({"n": [sum(r["n"] for r in rows)], "sum": [total.tobytes()], "gram": [gram.tobytes()]})


def fit(moments: dict, dim: int) -> dict[str, np.ndarray]:
    """Mean and the top `dim` principal directions (rows), from the catalog's summed moments (one row of
    `add_moments`)."""
    n = moments["n"]
    total = np.frombuffer(moments["sum"])
    d = len(total)
    gram = np.frombuffer(moments["gram"]).reshape(d, d)
    mean = total / n
    cov = gram / n - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    comps = vecs[:, ::-1][:, :dim].T
    # eigh's signs are arbitrary; fixing them makes the projection reproducible across fits.
    comps *= np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])[:, None]
    return {"mean": mean.astype(np.float32), "components": comps.astype(np.float32)}


def project(batch: pa.Table, pca: dict[str, np.ndarray]) -> pa.Table:
    x = (vectors_of(batch) - pca["mean"]) @ pca["components"].T
    return embeddings_table(batch[ITEM_ID].combine_chunks(), batch[TEXT_HASH].combine_chunks(), x)


def to_bytes(pca: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **pca)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}
