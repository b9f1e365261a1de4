"""The Ray Data side of the embedding job: the catalog through the model's actor pool and the streaming
PCA fit. Blocks are written, and vectors carried over from a previous version, by blockio.py.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pyarrow as pa

from llmemb_dist import storage
from llmemb_dist.blockio import read, read_not_carried, uris
from llmemb_dist.config import Config
from llmemb_dist.stages.embed import pca as embed_pca
from llmemb_dist.stages.embed.actor import SORT_WINDOW, EmbedActor, PromptTokenizer
from llmemb_dist.stages.embed.plan import Plan

log = logging.getLogger(__name__)


def embedded(cfg: Config, plan: Plan, adapter: tuple[str, dict] | None, txn: str):
    """The Ray Dataset of new and changed items' embeddings (lazy)."""
    from ray.data import ActorPoolStrategy

    e = cfg.embed
    if plan.reused:
        catalog = read_not_carried(plan.catalog_files, plan.carry)
    else:
        # Ray Data reads a small catalog as one block, which would leave all but one actor idle: ask for a
        # few read tasks per actor (splitting files at read time keeps the pipeline streaming).
        catalog = read(plan.catalog_files, min_blocks=e.num_actors * 4)
    marker = str(Path(tempfile.gettempdir()) / f"llmemb-embed-fault-{txn}") if e.fail_actor_once else None
    # Blocks of one model call each, so the model starts on the first rows while the next are tokenized.
    catalog = catalog.repartition(target_num_rows_per_block=e.batch_size * SORT_WINDOW)
    # A tokenizer reserves no CPU: it works while its model actor computes, and a reservation would take
    # from the reads and writes the whole CPU they need (cluster.check_actor_pool).
    tokens = catalog.map_batches(PromptTokenizer, fn_constructor_kwargs={"model": cfg.model},
                                 batch_size=e.batch_size * SORT_WINDOW, batch_format="pyarrow",
                                 compute=ActorPoolStrategy(size=e.num_actors), num_cpus=0)
    return tokens.map_batches(
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


REDUCE_FAN_IN = 8  # blocks' moments one task adds up: at d = 4096, 8 x 128 MiB in a task's memory


def fit_pca(folder: str, files: list[dict], dim: int) -> dict:
    """The PCA of the vectors in `files`: each block's moments stay in the object store and are added up in
    a tree of tasks, so the driver receives one d x d matrix, not one per block."""
    parts = read(uris(folder, files)).map_batches(embed_pca.block_moments, batch_format="pyarrow").to_arrow_refs()
    (moments,) = moments_in_tree(parts).to_pylist()
    log.info("fitting PCA to %d dimensions on %d items", dim, moments["n"])
    return embed_pca.fit(moments, dim)


def moments_in_tree(parts: list) -> pa.Table:
    """The sum of the moments tables behind the object refs `parts`, added by tasks REDUCE_FAN_IN at a time."""
    import ray

    add = ray.remote(embed_pca.add_moments)
    while len(parts) > REDUCE_FAN_IN:
        parts = [add.remote(*parts[i: i + REDUCE_FAN_IN]) for i in range(0, len(parts), REDUCE_FAN_IN)]
    return ray.get(add.remote(*parts))
