"""Stage 2: embed every catalog item with Ray Data, or only the changed ones (incremental mode).

The driver plans from per-file counts and checksums of the (item_id, text_hash) columns that Ray tasks
compute (the keys themselves stay in Ray's object store), the model runs in an actor pool
(one replica per GPU or per `cpus_per_actor` cores), and every block is written straight to
`<version>/<data-txn>/embeddings/` by Ray workers: the vectors never pass through the driver,
which is what lets this scale to 10^8 items (10^8 x 4096 float32 is 1.6 TB). Each written file
reports its row count and a checksum of its (item_id, text_hash) rows; the driver publishes only
if they add up to exactly the catalog (exactly once, even after an actor died and was retried).
"""
from __future__ import annotations

import logging
import time

from llmemb_dist import blockio, layout, storage, versions
from llmemb_dist.config import Config, ConfigError
from llmemb_dist.distributed.cluster import check_actor_pool, init_ray
from llmemb_dist.llm.loading import base_model_info, resolve_model
from llmemb_dist.progress import Progress
from llmemb_dist.stages.embed import dataflow
from llmemb_dist.stages.embed import pca as embed_pca
from llmemb_dist.stages.embed.plan import (EMBEDDINGS, encoder_identity, hidden_size, make_plan, previous_pca,
                                           resolve_adapter)

log = logging.getLogger(__name__)


def embed(cfg: Config) -> str:
    """Embeds the catalog of cfg.dataset into embeddings/<cfg.embed.version>; returns its URI."""
    out_uri = layout.embeddings_uri(cfg)
    data_uri = layout.dataset_uri(cfg)
    data_manifest = storage.read_manifest(data_uri)
    source = resolve_model(cfg.model)
    base = base_model_info(source, cfg.model)
    adapter = resolve_adapter(cfg, base)
    encoder = encoder_identity(cfg, base, adapter)
    model_dim = hidden_size(source)
    if cfg.embed.pca_dim > model_dim:
        raise ConfigError(f"embed.pca_dim must be between 0 and the model's dimension {model_dim}, got {cfg.embed.pca_dim}")
    dim = cfg.embed.pca_dim or model_dim
    inputs = {
        "catalog": {"uri": data_uri, "data_dir": data_manifest["data_dir"], "config_hash": data_manifest["config_hash"]},
        "encoder": encoder,
        "pca_dim": cfg.embed.pca_dim,
        "incremental_from": cfg.embed.incremental_from or None,
    }
    if versions.already_published(cfg, EMBEDDINGS, out_uri, inputs):
        return out_uri

    init_ray(cfg.ray, cfg.log.verbose)
    check_actor_pool(cfg.embed.num_actors, cfg.embed.cpus_per_actor, "embed")
    plan = make_plan(cfg, data_uri, data_manifest, dim, encoder)
    counts = {"items": plan.keys.rows, "new": plan.new, "reused": plan.reused, "removed": plan.removed}
    log.info("embedding %s into %s: %s", data_uri, out_uri, counts)
    if plan.new == 0:
        log.info("no item is new or changed: no model work, carrying %d embeddings over", plan.reused)

    with versions.publishing(cfg, EMBEDDINGS, out_uri, inputs, plan.keys, plan.previous, dim) as version:
        pub = version.pub
        pca = previous_pca(plan.previous) if plan.previous else None
        start = time.time()
        if cfg.embed.pca_dim and pca is None:  # fit on this catalog: embed to a scratch folder first
            raw_folder = storage.join(pub.data_uri, "_raw")
            raw_files = blockio.write(dataflow.embedded(cfg, plan, adapter, pub.data_dir), raw_folder, cfg.embed.rows_per_file,
                                      Progress(log, "embed", plan.new, unit="items"))
            pca = dataflow.fit_pca(raw_folder, raw_files, cfg.embed.pca_dim)
            projected = blockio.read(blockio.uris(raw_folder, raw_files)).map_batches(
                embed_pca.project, fn_kwargs={"pca": pca}, batch_format="pyarrow")
            # Nothing is carried over: a previous version's vectors are not in the space of this PCA.
            rows, files = version.write(projected, carry=None, progress=None)
            storage.delete_tree(raw_folder)
        else:
            new = dataflow.embedded(cfg, plan, adapter, pub.data_dir) if plan.new else None
            if new is not None and pca:
                new = new.map_batches(embed_pca.project, fn_kwargs={"pca": pca}, batch_format="pyarrow")
            rows, files = version.write(new, plan.carry, Progress(log, "embed", plan.keys.rows, unit="items"))
        seconds = time.time() - start
        log.info("wrote %d embeddings in %d files in %.1f s (%.1f items/s embedded)",
                 rows, files, seconds, plan.new / max(seconds, 1e-9))
        if pca is not None:
            storage.write_bytes(storage.join(pub.data_uri, embed_pca.PCA_FILE), embed_pca.to_bytes(pca))
            pub.files.append(embed_pca.PCA_FILE)
        pub.info.update(
            base_model=base,
            adapter=adapter and {"uri": adapter[0], "config_hash": adapter[1]["config_hash"]},
            catalog=inputs["catalog"],
            counts=counts,
            pca=cfg.embed.pca_dim or None,
            encoder=encoder,
        )
        version.run.log_final({**counts, "rows": rows, "seconds": seconds, "items_per_s": plan.new / max(seconds, 1e-9)})
    log.info("published %s: %s", out_uri, counts)
    return out_uri
