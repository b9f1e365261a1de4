"""The Ray Data side of the embedding job: reading the catalog, the actor pool, writing and checking blocks.

Every block is written straight to storage by Ray workers; the vectors never pass through the driver.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pyarrow as pa

from llmemb_dist import storage
from llmemb_dist.config import Config
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH
from llmemb_dist.stages.embed import pca as embed_pca
from llmemb_dist.stages.embed.actor import SORT_WINDOW, EmbedActor
from llmemb_dist.stages.embed.blocks import key_checksum, keep_rows, write_block
from llmemb_dist.stages.embed.plan import Plan
from llmemb_dist.stages.embed.reading import read

log = logging.getLogger(__name__)


def embedded(cfg: Config, plan: Plan, adapter: tuple[str, dict] | None, txn: str):
    """The Ray Dataset of new and changed items' embeddings (lazy)."""
    import ray
    from ray.data import ActorPoolStrategy

    e = cfg.embed
    # Ray Data reads a small catalog as one block, which would leave all but one actor idle: ask for a
    # few read tasks per actor (splitting files at read time keeps the pipeline streaming).
    catalog = read(plan.catalog_files, min_blocks=e.num_actors * 4)
    if plan.reused:
        catalog = catalog.map_batches(keep_rows, fn_kwargs={"ids_ref": ray.put(plan.reused_ids), "keep": False}, batch_format="pyarrow")
    marker = str(Path(tempfile.gettempdir()) / f"llmemb-embed-fault-{txn}") if e.fail_actor_once else None
    return catalog.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model": cfg.model,
            "adapter_files": adapter and storage.join(storage.data_uri(adapter[0], adapter[1]), "adapter"),
            "batch_size": e.batch_size,
            "device": "cuda" if e.gpus_per_actor > 0 else "cpu",
            "num_threads": int(e.cpus_per_actor),
            "fault_marker": marker,
        },
        batch_size=e.batch_size * SORT_WINDOW,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=e.num_actors),
        num_cpus=e.cpus_per_actor,
        num_gpus=e.gpus_per_actor,
        # Exactly-once relies on Ray Data's actor-pool defaults (max_restarts and max_task_retries -1:
        # a dead actor is restarted and its batch retried; passing them is deprecated) and on the
        # idempotent writes and the checksum; the actor-fault test checks the whole.
    )


def carried_over(plan: Plan):
    import ray

    files = storage.table_files(plan.previous, "embeddings", plan.previous_manifest)
    return read(files).map_batches(keep_rows, fn_kwargs={"ids_ref": ray.put(plan.reused_ids), "keep": True}, batch_format="pyarrow")


def write(dataset, folder: str, rows_per_file: int) -> list[dict]:
    """Writes the dataset as content-named Parquet files; returns one record per distinct file."""
    records = dataset.map_batches(write_block, fn_kwargs={"folder_uri": folder}, batch_size=rows_per_file, batch_format="pyarrow").take_all()
    # A block written twice (its task retried) wrote the same file twice: count it once.
    return list({r["file"]: r for r in records}.values())


def uris(folder: str, meta: list[dict]) -> list[str]:
    return [storage.join(folder, m["file"]) for m in meta]


def fit_pca(folder: str, files: list[dict], dim: int) -> dict:
    moments = read(uris(folder, files)).map_batches(embed_pca.block_moments, batch_format="pyarrow").take_all()
    log.info("fitting PCA to %d dimensions on %d items", dim, sum(m["n"] for m in moments))
    return embed_pca.fit(moments, dim)


def verify(meta: list[dict], keys: pa.Table, out_uri: str) -> int:
    """Exactly once: the written rows must be the catalog's (item_id, text_hash) rows, each once."""
    rows = sum(m["rows"] for m in meta)
    checksum = sum(int(m["checksum"]) for m in meta) % 2**64
    if rows != keys.num_rows or checksum != key_checksum(keys[ITEM_ID], keys[TEXT_HASH]):
        raise storage.StorageError(
            f"{out_uri}: the written embeddings are not the catalog's items exactly once ({rows} rows written, "
            f"{keys.num_rows} expected; (item_id, text_hash) checksum "
            f"{'matches' if checksum == key_checksum(keys[ITEM_ID], keys[TEXT_HASH]) else 'differs'}); nothing is published"
        )
    return rows
