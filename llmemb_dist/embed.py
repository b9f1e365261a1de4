"""Stage 2: embed every catalog item with Ray Data, or only the changed ones (incremental mode).

The driver plans from narrow columns (item_id, text_hash), the model runs in an actor pool
(one replica per GPU or per `cpus_per_actor` cores), and every block is written straight to
`<version>/<data-txn>/embeddings/` by Ray workers: the vectors never pass through the driver,
which is what lets this scale to 10^8 items (10^8 x 4096 float32 is 1.6 TB). Each written file
reports its row count and a checksum of its (item_id, text_hash) rows; the driver publishes only
if they add up to exactly the catalog (exactly once, even after an actor died and was retried).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist import embed_pca, storage
from llmemb_dist.cluster import init_ray
from llmemb_dist.config import Config, ConfigError, config_hash, to_dict
from llmemb_dist.data.catalog import ITEM_ID, TEXT_HASH, text_hash
from llmemb_dist.embed_udf import SORT_WINDOW, EmbedActor, embeddings_schema, key_checksum, keep_rows, write_block
from llmemb_dist.llm.loading import ModelSource, base_model_info, resolve_model
from llmemb_dist.prepare import dataset_uri

log = logging.getLogger(__name__)
EMPTY_TEXT_HASH = text_hash([])  # the hash of an item with every attribute empty


def embeddings_uri(cfg: Config, version: str | None = None) -> str:
    return storage.join(cfg.root, "embeddings", version or cfg.embed.version)


@dataclass
class Plan:
    """What this run embeds, and what it carries over from a previous version."""

    catalog_files: list[str]
    keys: pa.Table  # item_id, text_hash of the whole catalog
    previous: str | None = None
    previous_manifest: dict | None = None
    reused_ids: pa.Array | None = None
    removed: int = 0

    @property
    def reused(self) -> int:
        return 0 if self.reused_ids is None else len(self.reused_ids)

    @property
    def new(self) -> int:
        return self.keys.num_rows - self.reused


def embed(cfg: Config) -> str:
    """Embeds the catalog of cfg.dataset into embeddings/<cfg.embed.version>; returns its URI."""
    out_uri = embeddings_uri(cfg)
    data_uri = dataset_uri(cfg)
    data_manifest = storage.read_manifest(data_uri)
    source = resolve_model(cfg.model)
    base = base_model_info(source, cfg.model)
    adapter = _resolve_adapter(cfg, base)
    encoder = _encoder_identity(cfg, base, adapter)
    for key in ("batch_size", "num_actors", "rows_per_file"):
        if getattr(cfg.embed, key) < 1:
            raise ConfigError(f"embed.{key} must be at least 1, got {getattr(cfg.embed, key)}")
    model_dim = _hidden_size(source)
    if cfg.embed.pca_dim < 0 or cfg.embed.pca_dim > model_dim:
        raise ConfigError(f"embed.pca_dim must be between 0 and the model's dimension {model_dim}, got {cfg.embed.pca_dim}")
    dim = cfg.embed.pca_dim or model_dim
    inputs = {
        "catalog": {"uri": data_uri, "data_dir": data_manifest["data_dir"], "config_hash": data_manifest["config_hash"]},
        "encoder": encoder,
        "pca_dim": cfg.embed.pca_dim,
        "incremental_from": cfg.embed.incremental_from or None,
    }
    if storage.is_published(out_uri):
        if storage.read_manifest(out_uri)["inputs"] == inputs:
            log.info("%s is already published from this catalog and model: nothing to do, no model work", out_uri)
            return out_uri
        raise storage.AlreadyPublished(f"{out_uri} is published from other inputs; choose another embed.version")

    init_ray(cfg.ray)
    plan = _plan(cfg, data_uri, data_manifest, dim, encoder)
    counts = {"items": plan.keys.num_rows, "new": plan.new, "reused": plan.reused, "removed": plan.removed}
    log.info("embedding %s into %s: %s", data_uri, out_uri, counts)
    if plan.new == 0:
        log.info("no item is new or changed: no model work, carrying %d embeddings over", plan.reused)

    with storage.publish(out_uri, kind="embeddings", config=to_dict(cfg), config_hash=config_hash(cfg.embed), inputs=inputs) as pub:
        pca = _previous_pca(plan) if plan.previous else None
        folder = storage.join(pub.data_uri, "embeddings")
        start = time.time()
        if cfg.embed.pca_dim and pca is None:  # fit on this catalog: embed to a scratch folder first
            raw_folder = storage.join(pub.data_uri, "_raw")
            raw_files = _write(_embedded(cfg, plan, adapter, pub.data_dir), raw_folder, cfg.embed.rows_per_file)
            pca = _fit_pca(raw_folder, raw_files, cfg.embed.pca_dim)
            meta = _write(_read(_uris(raw_folder, raw_files)).map_batches(
                embed_pca.project, fn_kwargs={"pca": pca}, batch_format="pyarrow"), folder, cfg.embed.rows_per_file)
            storage.delete_tree(raw_folder)
        else:
            parts = []
            if plan.new:
                new = _embedded(cfg, plan, adapter, pub.data_dir)
                parts.append(new.map_batches(embed_pca.project, fn_kwargs={"pca": pca}, batch_format="pyarrow") if pca else new)
            if plan.reused:
                parts.append(_carried_over(plan))
            meta = _write(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], folder, cfg.embed.rows_per_file)
        rows = _verify(meta, plan.keys, out_uri)
        log.info("wrote %d embeddings in %d files in %.1f s (%.1f items/s embedded)",
                 rows, len(meta), time.time() - start, plan.new / max(time.time() - start, 1e-9))
        pub.add_table_files("embeddings", [m["file"] for m in meta], rows, embeddings_schema(dim))
        if pca is not None:
            storage.write_bytes(storage.join(pub.data_uri, embed_pca.PCA_FILE), embed_pca.to_bytes(pca))
            pub.files.append(embed_pca.PCA_FILE)
        pub.info.update(
            base_model=base,
            adapter=adapter and {"uri": adapter[0], "config_hash": adapter[1]["config_hash"]},
            catalog=inputs["catalog"],
            dim=dim,
            counts=counts,
            pca=cfg.embed.pca_dim or None,
            encoder=encoder,
            previous=plan.previous,
        )
    log.info("published %s: %s", out_uri, counts)
    return out_uri


# ---------------------------------------------------------------- planning


def _resolve_adapter(cfg: Config, base: dict) -> tuple[str, dict] | None:
    """(URI, manifest) of the adapter to use, or None for the bare base model."""
    choice = cfg.embed.adapter
    if choice == "none":
        return None
    uri = storage.join(cfg.root, "scft", cfg.scft.run, "adapter") if choice == "auto" else choice
    if choice == "auto" and not storage.is_published(uri):
        log.warning("no published SCFT adapter at %s: embedding with the bare base model (the no-SCFT baseline)", uri)
        return None
    manifest = storage.read_manifest(uri)
    trained_on = manifest.get("base_model") or {}
    if trained_on.get("fingerprint") != base["fingerprint"]:
        raise ConfigError(
            f"embed.adapter: the adapter at {uri} was trained on base model {trained_on.get('path')!r} "
            f"(fingerprint {trained_on.get('fingerprint')}), but model.path is {base['path']!r} "
            f"(fingerprint {base['fingerprint']})"
        )
    return uri, manifest


def _encoder_identity(cfg: Config, base: dict, adapter: tuple[str, dict] | None) -> str:
    """A hash of everything that decides an item's vector besides its attribute text (text_hash)."""
    m = cfg.model
    parts = {
        "base": base["fingerprint"], "pooling": m.pooling, "dtype": m.dtype, "max_length": m.max_length,
        "instruction": m.instruction, "adapter": adapter and [adapter[1]["data_dir"], adapter[1]["config_hash"]],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _hidden_size(source: ModelSource) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.folder, **source.from_pretrained_kwargs())
    return int(config.hidden_size)


def _plan(cfg: Config, data_uri: str, data_manifest: dict, dim: int, encoder: str) -> Plan:
    if data_manifest["tables"].get("catalog", {}).get("rows", 0) == 0:
        raise storage.DataError(f"{data_uri}: the catalog is empty: nothing to embed")
    files = storage.table_files(data_uri, "catalog", data_manifest)
    keys = _read_keys(files)
    blank = pc.equal(keys[TEXT_HASH], EMPTY_TEXT_HASH)
    if pc.any(blank).as_py():
        item = keys[ITEM_ID].filter(blank)[0].as_py()
        raise storage.DataError(f"{data_uri} (catalog): item {item!r} has every attribute empty: nothing to embed")
    plan = Plan(catalog_files=files, keys=keys)
    if not cfg.embed.incremental_from:
        return plan
    prev_uri = embeddings_uri(cfg, cfg.embed.incremental_from)
    prev = storage.read_manifest(prev_uri)
    if prev["dim"] != dim:
        raise storage.DataError(
            f"{prev_uri}: the previous version has dimension {prev['dim']}, this run gives {dim} "
            f"(embed.pca_dim={cfg.embed.pca_dim}); incremental mode needs equal dimensions: run a full embedding"
        )
    if prev.get("encoder") != encoder:
        # A scheduled re-embedding after a new SCFT adapter lands here: embed everything, do not fail.
        log.warning("%s was embedded with another model, adapter or prompt: no vector can be reused, "
                    "embedding every item", prev_uri)
        return plan
    prev_keys = _read_keys(storage.table_files(prev_uri, "embeddings", prev))
    same = pc.is_in(_joined(keys), value_set=_joined(prev_keys))
    plan.previous, plan.previous_manifest = prev_uri, prev
    plan.reused_ids = keys[ITEM_ID].filter(same).combine_chunks()
    plan.removed = int(pc.sum(pc.invert(pc.is_in(prev_keys[ITEM_ID], value_set=keys[ITEM_ID]))).as_py() or 0)
    return plan


def _joined(keys: pa.Table) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(keys[ITEM_ID], keys[TEXT_HASH], "\x1f")


def _previous_pca(plan: Plan) -> dict | None:
    if not plan.previous_manifest.get("pca"):
        return None
    return embed_pca.from_bytes(storage.read_bytes(storage.join(storage.data_uri(plan.previous, plan.previous_manifest), embed_pca.PCA_FILE)))


# ---------------------------------------------------------------- Ray Data


def _read(uris: list[str], columns: list[str] | None = None, min_blocks: int = 0):
    import ray

    fs, _ = storage.resolve(uris[0])
    blocks = {"override_num_blocks": max(len(uris), min_blocks)} if min_blocks else {}
    return ray.data.read_parquet([storage.resolve(u)[1] for u in uris], filesystem=fs, columns=columns, **blocks)


def _read_keys(files: list[str]) -> pa.Table:
    """The (item_id, text_hash) columns only; read by Ray workers, gathered on the driver."""
    import ray

    tables = ray.get(_read(files, columns=[ITEM_ID, TEXT_HASH]).to_arrow_refs())
    return pa.concat_tables([t.select([ITEM_ID, TEXT_HASH]) for t in tables]).combine_chunks()


def _embedded(cfg: Config, plan: Plan, adapter: tuple[str, dict] | None, txn: str):
    """The Ray Dataset of new and changed items' embeddings (lazy)."""
    import ray
    from ray.data import ActorPoolStrategy

    e = cfg.embed
    # Ray Data reads a small catalog as one block, which would leave all but one actor idle: ask for a
    # few read tasks per actor (splitting files at read time keeps the pipeline streaming).
    catalog = _read(plan.catalog_files, min_blocks=e.num_actors * 4)
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


def _carried_over(plan: Plan):
    import ray

    files = storage.table_files(plan.previous, "embeddings", plan.previous_manifest)
    return _read(files).map_batches(keep_rows, fn_kwargs={"ids_ref": ray.put(plan.reused_ids), "keep": True}, batch_format="pyarrow")


def _write(ds, folder: str, rows_per_file: int) -> list[dict]:
    """Writes the dataset as content-named Parquet files; returns one record per distinct file."""
    records = ds.map_batches(write_block, fn_kwargs={"folder_uri": folder}, batch_size=rows_per_file, batch_format="pyarrow").take_all()
    # A block written twice (its task retried) wrote the same file twice: count it once.
    return list({r["file"]: r for r in records}.values())


def _uris(folder: str, meta: list[dict]) -> list[str]:
    return [storage.join(folder, m["file"]) for m in meta]


def _fit_pca(folder: str, files: list[dict], dim: int) -> dict:
    moments = _read(_uris(folder, files)).map_batches(embed_pca.block_moments, batch_format="pyarrow").take_all()
    log.info("fitting PCA to %d dimensions on %d items", dim, sum(m["n"] for m in moments))
    return embed_pca.fit(moments, dim)


def _verify(meta: list[dict], keys: pa.Table, out_uri: str) -> int:
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
