"""The index kinds and how each is built: exact inner product, HNSW, IVF; faiss imported only inside the
index stage's functions and the index files' reader (data/index_files.py), so the rest of the package runs
without it."""
from __future__ import annotations

from typing import Any

import numpy as np

from llmemb_dist import storage
from llmemb_dist.config import IndexConfig

# IVF's k-means trains on this many vectors per cell at most: faiss warns below 39 per cell, and more
# than a few hundred per cell moves the centroids little while the training time grows with it.
TRAIN_PER_CELL = 64
# What an IVF index's trained cells depend on: an update (incremental.py) keeps them only when these match.
TRAINED = ("kind", "nlist", "seed")


def resolve(cfg: IndexConfig, items: int, source: str) -> dict[str, Any]:
    """The kind `cfg` asks for over `items` vectors and the parameters that kind uses: what identifies an index."""
    kind = cfg.kind if cfg.kind != "auto" else ("exact" if items < cfg.exact_below else "ivf")
    if kind == "hnsw":
        return {"kind": kind, "m": cfg.m, "ef_construction": cfg.ef_construction, "ef_search": cfg.ef_search}
    if kind == "ivf":
        if cfg.nlist > items:
            raise storage.DataError(f"{source}: index.nlist {cfg.nlist} is more than its {items} items; "
                                    "choose fewer cells")
        return {"kind": kind, "nlist": cfg.nlist, "nprobe": cfg.nprobe, "seed": cfg.seed}
    return {"kind": "exact"}


def build(vectors: np.ndarray, params: dict[str, Any], num_threads: int = 0):
    """A faiss index over the rows of `vectors` (row i is label i), searched by inner product."""
    import faiss

    use_threads(num_threads)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    if params["kind"] == "exact":
        index = faiss.IndexFlatIP(d)
    elif params["kind"] == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(params["seed"])
        sample = min(len(vectors), params["nlist"] * TRAIN_PER_CELL)
        index.cp.seed = params["seed"]
        index.train(vectors[np.sort(rng.choice(len(vectors), sample, replace=False))])
        index.nprobe = params["nprobe"]
    index.add(vectors)
    return index


def use_threads(num_threads: int) -> None:
    """FAISS's threads from here on: `num_threads`; 0 leaves them as they are (all cores unless set)."""
    import faiss

    if num_threads:
        faiss.omp_set_num_threads(num_threads)


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """The labels of the `k` best rows of `vectors` by inner product for each query, by brute force."""
    import faiss

    _, labels = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                          np.ascontiguousarray(vectors, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return labels


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Recall@k of (queries, k) labels against exact search's: the share of the true top k found."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))
