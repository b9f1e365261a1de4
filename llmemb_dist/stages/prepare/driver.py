"""Stage 0: import a raw dataset into the sharded catalog + interactions of the design."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from llmemb_dist import layout, storage, tracking
from llmemb_dist.config import Config, config_hash, to_dict
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
    source = cfg.dataset.source
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.dataset.format == "parquet":  # read in place, streamed from the folder or bucket
            raw = read_dataset("parquet", source, parquet=cfg.dataset.parquet)
        else:
            raw = read_dataset(cfg.dataset.format, _local(source, tmp), _local(cfg.dataset.metadata, tmp))
        prepared = preprocess(raw, cfg.dataset, source, Path(tmp))
        counts = prepared.counts
        with tracking.stage_run(cfg, "prepare", cfg.dataset.name) as run, storage.publish(
            uri, kind="dataset", config=to_dict(cfg.dataset), config_hash=config_hash(cfg.dataset),
            inputs={"source": source, "format": cfg.dataset.format}, overwrite=overwrite,
        ) as pub:
            pub.write_batches("catalog", prepared.catalog(), counts["items"], cfg.dataset.num_shards)
            pub.write_batches("interactions", prepared.interactions(), counts["interactions"], cfg.dataset.num_shards)
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
