"""Stage 0: import a raw dataset into the sharded catalog + interactions of the design."""
from __future__ import annotations

import logging
import tempfile
import time

from llmemb_dist import layout, storage, tracking
from llmemb_dist.config import Config, config_hash, to_dict
from llmemb_dist.data.catalog import (
    ITEM_ID,
    USER_ID,
    catalog_table,
    interactions_table,
    refuse_undescribed_items,
    validate_catalog,
    validate_interactions,
)
from llmemb_dist.data.importers import read_dataset
from llmemb_dist.data.preprocess import preprocess

log = logging.getLogger(__name__)


def prepare(cfg: Config, overwrite: bool = False) -> str:
    """Imports, validates and publishes the dataset; returns its URI. A published one is kept as is."""
    uri = layout.dataset_uri(cfg)
    if not overwrite and storage.already_published(
        uri, {"config_hash": config_hash(cfg.dataset)}, "dataset", differs="another dataset config",
        hint="use another dataset.name or overwrite",
    ):
        return uri
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        items, inter = read_dataset(cfg.dataset.format, _local(cfg.dataset.source, tmp), _local(cfg.dataset.metadata, tmp),
                                    cfg.dataset.timestamp_unit)
    source = cfg.dataset.source
    validate_catalog(items, f"{source} (items)")
    validate_interactions(inter, set(items[ITEM_ID]), f"{source} (interactions)")
    items, inter = preprocess(items, inter, cfg.dataset)
    refuse_undescribed_items(items, f"{source} (items)")
    catalog, interactions = catalog_table(items), interactions_table(inter)
    counts = {
        "users": int(inter[USER_ID].nunique()),
        "items": catalog.num_rows,
        "interactions": interactions.num_rows,
    }
    with tracking.stage_run(cfg, "prepare", cfg.dataset.name) as run, storage.publish(
        uri, kind="dataset", config=to_dict(cfg.dataset), config_hash=config_hash(cfg.dataset),
        inputs={"source": source, "format": cfg.dataset.format}, overwrite=overwrite,
    ) as pub:
        pub.write_table("catalog", catalog, cfg.dataset.num_shards)
        pub.write_table("interactions", interactions, cfg.dataset.num_shards)
        pub.info["counts"] = counts
        run.log_final({**counts, "seconds": time.time() - started})
        run.publish(pub)
    log.info("published dataset %s: %s", uri, counts)
    return uri


def _local(source: str, tmp: str) -> str:
    """Raw files on object storage are copied to a local folder first; the importers read local files."""
    if not source or "://" not in source:
        return source
    try:
        return str(storage.download(source, tmp))
    except FileNotFoundError as e:
        raise storage.DataError(f"dataset.source: {e}") from None
