"""RAT's inputs: the users' sequences of the published dataset and the LLM table of an embeddings version."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist import layout, storage
from llmemb_dist.config import Config
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH, TIMESTAMP
from llmemb_dist.data.cold import ColdSplit, choose_cold, cold_split
from llmemb_dist.data.sequences import Sequences, build_sequences

log = logging.getLogger(__name__)


def load_sequences(cfg: Config) -> Sequences:
    """Every user's sequence over the active items: the catalog items that appear in the interactions,
    in catalog order. Items nobody interacted with are left to the adapt stage, so RAT's memory grows
    with the active set, not with the catalog."""
    uri = layout.dataset_uri(cfg)
    interactions = storage.read_table(uri, "interactions")
    catalog = storage.read_table(uri, "catalog").column(ITEM_ID)
    active = catalog.filter(pc.is_in(catalog, value_set=interactions.column(ITEM_ID).unique()))
    return build_sequences(interactions, active.to_pylist(), f"{uri}/interactions")


def load_cold_split(cfg: Config, data: Sequences) -> ColdSplit:
    """`data` with the cold items of `rat.cold` held out: a seeded fraction, or those first seen after a time."""
    cold = cfg.rat.cold
    first_seen = None
    if cold.first_seen_after > 0:
        interactions = storage.read_table(layout.dataset_uri(cfg), "interactions").select([ITEM_ID, TIMESTAMP])
        first = interactions.group_by(ITEM_ID).aggregate([(TIMESTAMP, "min")])
        row = pc.index_in(pa.array(data.item_ids, pa.string()), value_set=first.column(ITEM_ID))
        first_seen = np.concatenate([[0.0], first.column(f"{TIMESTAMP}_min").take(row).to_numpy().astype(float)])
    split = cold_split(data, choose_cold(data, cold.fraction, cold.seed, first_seen, cold.first_seen_after))
    log.info("cold-start split: %d warm and %d cold items; %d of %d test users have a cold next item",
             split.num_warm, len(split.item_ids) - split.num_warm, int(split.cold_target.sum()), len(split.test_targets))
    return split


def catalog_text_hashes(cfg: Config, item_ids: list[str]) -> list[str]:
    """The text hash of each item (the catalog's): what says later whether an item's text has changed."""
    catalog = storage.read_table(layout.dataset_uri(cfg), "catalog").select([ITEM_ID, TEXT_HASH])
    row = pc.index_in(pa.array(item_ids, pa.string()), value_set=catalog.column(ITEM_ID))
    return catalog.column(TEXT_HASH).take(row).to_pylist()
