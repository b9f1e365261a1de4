"""The index of a new adapted version, updated from a previous one where it can be
(`index.incremental_from`): that version's IVF index with the items that left the catalog or whose vector
changed removed and the changed and new ones added, over the cells it was trained with; else built.

Which items changed is found from the vectors themselves: each vector the previous index holds is compared
with the new version's vector of the same item. The adapted version's manifest records how many rows it
carried over, not which, and an item's vector in the index also holds its text channel, which comes from
the embeddings version; comparing the vectors makes the update equal to a build over the same cells
whatever lineage the two versions have, and another lineage shows as a change too large to update.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmemb_dist import layout, storage
from llmemb_dist.config import Config
from llmemb_dist.data import index_files
from llmemb_dist.stages.index import kinds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Made:
    """An index over the new version and what its manifest records of how it was made."""

    index: object
    labels: np.ndarray  # the label of each item of the new version, in its order
    build: dict[str, Any]  # built in full (and why, when an update was asked for) or updated, from what, by how much
    quantizer: dict[str, int] | None  # ivf: the items its cells were trained over and how many changed since


@dataclass(frozen=True)
class Change:
    """What makes an index of the previous version hold the new version's vectors and nothing else."""

    labels: np.ndarray  # the new version's labels: an item keeps its label, a new one takes the next unused
    stale: np.ndarray  # labels to remove: items gone, and items whose vector changed
    rows: np.ndarray  # rows of the new version to add: new items, and items whose vector changed
    new: int  # items the previous index did not hold

    def apply(self, index, vectors: np.ndarray) -> None:
        if len(self.stale):
            index.remove_ids(self.stale)
        index.add_with_ids(vectors[self.rows], self.labels[self.rows])


def make(cfg: Config, params: dict[str, Any], item_ids: list[str], vectors: np.ndarray) -> Made:
    """The index of `params` over `vectors` (row k for item_ids[k]): `index.incremental_from`'s updated
    where it can be, else built; the log says which, and why."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not cfg.index.incremental_from:
        return built(params, vectors, cfg.index.num_threads, {"mode": "full"})
    uri = layout.index_uri(cfg, cfg.index.incremental_from)
    source = {"uri": uri, "data_dir": None}
    try:
        previous = storage.read_manifest(uri)
    except storage.NotPublished:
        reason = "nothing is published there"
    else:
        source["data_dir"] = previous["data_dir"]
        reason = unfit(previous, params, vectors.shape[1])
    if not reason:
        index, labels, previous_ids = index_files.read(uri, previous)
        if not hasattr(index, "invlists"):
            raise storage.DataError(f"{uri}: its {index_files.FOLDER}/{index_files.FILE} holds a "
                                    f"{type(index).__name__}, where its manifest names an IVF index")
        change = changes(index, labels, previous_ids, item_ids, vectors)
        # An index published before updates existed was built, over the items it holds.
        trained = previous.get("quantizer") or {"trained_over": previous["items"], "changed_since": 0}
        cells = {**trained, "changed_since": trained["changed_since"] + len(change.stale) + change.new}
        reason = too_much(cells, cfg.index.incremental_max_change)
    if reason:
        log.info("building the index in full rather than updating %s: %s", uri, reason)
        return built(params, vectors, cfg.index.num_threads, {"mode": "full", "from": source, "reason": reason})
    kinds.use_threads(cfg.index.num_threads)
    change.apply(index, vectors)
    index.nprobe = params["nprobe"]
    log.info("updated the index of %s: %d vectors removed, %d added (%d of the %d items its cells were trained "
             "over changed since)", uri, len(change.stale), len(change.rows), cells["changed_since"],
             cells["trained_over"])
    return Made(index, change.labels, {"mode": "incremental", "from": source, "removed": len(change.stale),
                                       "added": len(change.rows)}, cells)


def built(params: dict[str, Any], vectors: np.ndarray, num_threads: int, build: dict[str, Any]) -> Made:
    """A new index, each item under its row as label; an IVF one's cells trained over every item."""
    quantizer = {"trained_over": len(vectors), "changed_since": 0} if params["kind"] == "ivf" else None
    return Made(kinds.build(vectors, params, num_threads), np.arange(len(vectors)), build, quantizer)


def unfit(previous: dict, params: dict[str, Any], dim: int) -> str | None:
    """Why the index of manifest `previous` cannot become one of `params` over `dim` dimensions, or None."""
    if params["kind"] != "ivf":
        return f"index.kind {params['kind']}: only an IVF index removes and adds vectors in place"
    was, wanted = ({k: p.get(k) for k in kinds.TRAINED} for p in (previous.get("index") or {}, params))
    if was != wanted:
        return f"its cells are those of {was}, not of {wanted}"
    if previous.get("dim") != dim:
        return f"it holds vectors of {previous.get('dim')} dimensions, not {dim}"
    return None


def too_much(cells: dict[str, int], max_change: float) -> str | None:
    """Why the cells must be trained again, or None: k-means over one catalog fits the next one's vectors
    less well the more of it has changed."""
    if cells["changed_since"] > max_change * cells["trained_over"]:
        return (f"{cells['changed_since']} items removed, added or changed since its cells were trained over "
                f"{cells['trained_over']}, more than index.incremental_max_change {max_change} of them")
    return None


def changes(index, labels: np.ndarray, previous_ids: list[str], item_ids: list[str], vectors: np.ndarray) -> Change:
    """What makes `index`, an IVF index holding previous_ids[k] under labels[k], hold vectors[k] for each
    item_ids[k] and nothing else."""
    from faiss.contrib.inspect_tools import get_invlist

    row = {item: k for k, item in enumerate(item_ids)}
    new_row = np.full(int(labels.max()) + 1, -1, dtype=np.int64)  # by previous label: its item's new row
    new_row[labels] = [row.get(item, -1) for item in previous_ids]
    kept = np.zeros(len(item_ids), dtype=bool)  # rows whose vector the index holds as it is
    stale = [np.empty(0, dtype=np.int64)]
    for cell in range(index.nlist):  # a cell's vectors at a time: the previous ones are never all copied out
        held, codes = get_invlist(index.invlists, cell)
        rows = new_row[held]
        same = rows >= 0
        same[same] = (codes[same].view(np.float32) == vectors[rows[same]]).all(axis=1)
        kept[rows[same]] = True
        stale.append(held[~same])
    label_of = dict(zip(previous_ids, labels.tolist()))
    new_labels = np.array([label_of.get(item, -1) for item in item_ids], dtype=np.int64)
    new = new_labels < 0
    new_labels[new] = labels.max() + 1 + np.arange(new.sum())
    return Change(new_labels, np.concatenate(stale), np.flatnonzero(~kept), int(new.sum()))
