"""The paper's preprocessing: item slicing, iterative k-core, sequence-length limits, value truncation.

Deterministic: interactions are sorted stably by (user, timestamp), so ties keep input order
and the same input always gives the same rows in the same order.
"""
from __future__ import annotations

import logging

import pandas as pd

from llmemb_dist.config import DatasetConfig
from llmemb_dist.data.catalog import ITEM_ID, TIMESTAMP, USER_ID, attribute_columns
from llmemb_dist.storage import DataError

log = logging.getLogger(__name__)


def preprocess(items: pd.DataFrame, inter: pd.DataFrame, cfg: DatasetConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    inter = inter.sort_values([USER_ID, TIMESTAMP], kind="stable").reset_index(drop=True)
    filtered = bool(cfg.max_items or cfg.k_core or cfg.min_seq_len or cfg.max_seq_len)
    if cfg.max_items:
        counts = inter[ITEM_ID].value_counts()
        popular = sorted(counts.index, key=lambda i: (-counts[i], i))[: cfg.max_items]
        inter = inter[inter[ITEM_ID].isin(set(popular))]
    if cfg.k_core:
        inter = k_core(inter, cfg.k_core)
    if cfg.max_seq_len:
        inter = inter.groupby(USER_ID, sort=False, group_keys=False).tail(cfg.max_seq_len)
    if cfg.min_seq_len:
        sizes = inter.groupby(USER_ID)[USER_ID].transform("size")
        inter = inter[sizes >= cfg.min_seq_len]
    if inter.empty:
        raise DataError(
            f"dataset {cfg.name!r}: filtering (k_core={cfg.k_core}, min_seq_len={cfg.min_seq_len}, "
            f"max_items={cfg.max_items}) leaves no interactions"
        )
    if filtered:  # items that lost every interaction leave the catalog too, as in the paper's data
        items = items[items[ITEM_ID].isin(set(inter[ITEM_ID]))]
    if cfg.attributes:
        unknown = [a for a in cfg.attributes if a not in items.columns]
        if unknown:
            raise DataError(f"dataset.attributes: {unknown[0]!r} is not an item column (have {list(items.columns)})")
        items = items[[ITEM_ID, *cfg.attributes]]
    if cfg.max_attr_chars:
        items = items.copy()
        for col in attribute_columns(list(items.columns)):
            items[col] = items[col].map(lambda v: v[: cfg.max_attr_chars] if isinstance(v, str) else v)
    return items.reset_index(drop=True), inter.reset_index(drop=True)


def k_core(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Drops users and items with fewer than k interactions until none is left to drop."""
    while True:
        user_n = inter.groupby(USER_ID)[USER_ID].transform("size")
        item_n = inter.groupby(ITEM_ID)[ITEM_ID].transform("size")
        keep = (user_n >= k) & (item_n >= k)
        if keep.all():
            return inter
        inter = inter[keep]
