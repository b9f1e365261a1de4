"""Stage 4, adapt: a trained RAT model plus any embeddings version gives `<root>/adapted/<version>/`, the
recommender-space vector of every item of that version (item_id, text_hash, embedding), new items included.

Items RAT trained on whose text is unchanged get exactly the vectors RAT published; every other item gets
what the item representation gives it from its LLM vector (srs/placement.py). A Ray Data job streams the
embeddings through an actor pool and writes each block straight to storage, so no process holds the
catalog's vectors. With `adapt.incremental_from`, items whose LLM vector and model are unchanged are
carried over from a previous adapted version; a rerun with nothing changed does nothing.
"""
from __future__ import annotations

import logging
import time


from llmemb_dist import blockio, layout, storage, versions
from llmemb_dist.config import Config
from llmemb_dist.distributed.cluster import check_actor_pool, init_ray
from llmemb_dist.progress import Progress
from llmemb_dist.stages.adapt.actor import PlaceActor

log = logging.getLogger(__name__)
ADAPTED = versions.Table(stage="adapt", kind="adapted", name="item_embeddings", what="adapted vectors",
                         uri=layout.adapted_uri)


def adapt(cfg: Config) -> str:
    """Publishes the adapted vectors of every item of the embeddings version; returns their URI."""
    out_uri = layout.adapted_uri(cfg)
    rat_uri, emb_uri = layout.rat_result_uri(cfg), layout.adapt_input_embeddings_uri(cfg)
    rat_manifest, emb_manifest = storage.read_manifest(rat_uri), storage.read_manifest(emb_uri)
    placement = check_inputs(rat_uri, rat_manifest, emb_uri, emb_manifest)
    inputs = {
        "rat": {"uri": rat_uri, "data_dir": rat_manifest["data_dir"]},
        "embeddings": {"uri": emb_uri, "data_dir": emb_manifest["data_dir"], "encoder": emb_manifest.get("encoder")},
        "incremental_from": cfg.adapt.incremental_from or None,
    }
    if versions.already_published(cfg, ADAPTED, out_uri, inputs):
        return out_uri

    init_ray(cfg.ray, cfg.log.verbose)
    check_actor_pool(cfg.adapt.num_actors, cfg.adapt.cpus_per_actor, "adapt")
    emb_files = storage.table_files(emb_uri, "embeddings", emb_manifest)
    keys = blockio.table_keys(emb_files, lookups=bool(cfg.adapt.incremental_from))
    previous = versions.previous_version(cfg, ADAPTED, keys, lambda prev_uri, prev: same_inputs(prev_uri, prev, inputs))
    carry = previous and previous.carry
    reused = carry.reused if carry else 0
    counts = {"items": keys.rows, "computed": keys.rows - reused, "reused": reused,
              "removed": carry.removed if carry else 0}
    log.info("adapting %s with %s into %s: %s", emb_uri, rat_uri, out_uri, counts)
    started = time.time()
    with versions.publishing(cfg, ADAPTED, out_uri, inputs, keys, previous, placement["hidden"]) as version:
        computed = placed(cfg, emb_files, carry, storage.join(storage.data_uri(rat_uri, rat_manifest),
                                                              placement["folder"])) if counts["computed"] else None
        version.write(computed, carry, Progress(log, "adapt", counts["items"], unit="items"))
        version.pub.info.update(counts=counts, item_repr=placement["item_repr"])
        seconds = time.time() - started
        version.run.log_final({**counts, "seconds": seconds, "items_per_s": counts["computed"] / max(seconds, 1e-9)})
    log.info("published %s in %.1f s: %s", out_uri, time.time() - started, counts)
    return out_uri


def check_inputs(rat_uri: str, rat_manifest: dict, emb_uri: str, emb_manifest: dict) -> dict:
    """The RAT publication's placement record, once the embeddings are known to be in the space RAT trained on."""
    placement = rat_manifest.get("placement")
    if not placement:
        raise storage.DataError(
            f"{rat_uri}: this RAT publication has no saved transform (published before the adapt stage existed): "
            "rerun RAT into a new rat.run")
    if placement["item_repr"] == "id":
        raise storage.DataError(
            f"{rat_uri}: rat.item_repr is 'id', which has no text side to place new items with; "
            "adapt needs an LLM-based item representation")
    trained = placement["embeddings"]
    if emb_manifest.get("dim") != placement["llm_dim"]:
        raise storage.DataError(
            f"{emb_uri}: embeddings of dimension {emb_manifest.get('dim')}, but RAT ({rat_uri}) trained on "
            f"dimension {placement['llm_dim']} ({trained['uri']})")
    if emb_manifest.get("encoder") != trained["encoder"]:
        base, trained_base = emb_manifest.get("base_model") or {}, trained.get("base_model") or {}
        raise storage.DataError(
            f"{emb_uri}: embedded by base model {base.get('path')!r} (encoder {emb_manifest.get('encoder')}), but RAT "
            f"({rat_uri}) trained on embeddings by {trained_base.get('path')!r} (encoder {trained['encoder']}, "
            f"{trained['uri']}): its adapter expects that encoder's space")
    if emb_manifest["tables"].get("embeddings", {}).get("rows", 0) == 0:
        raise storage.DataError(f"{emb_uri}: the embeddings version is empty: nothing to adapt")
    return placement


def same_inputs(prev_uri: str, prev: dict, inputs: dict) -> bool:
    """Whether the previous adapted version `prev` was made from the same model and LLM vectors."""
    same_model = prev["inputs"]["rat"]["data_dir"] == inputs["rat"]["data_dir"]
    same_encoder = prev["inputs"]["embeddings"]["encoder"] == inputs["embeddings"]["encoder"]
    if not (same_model and same_encoder):
        log.warning("%s was adapted with another RAT model or encoder: no vector can be reused, adapting every item",
                    prev_uri)
        return False
    return True


def placed(cfg: Config, emb_files: list[str], carry: blockio.CarryOver | None, placement_uri: str):
    """The Ray Dataset of the items to compute, through the placement on an actor pool (lazy)."""
    from ray.data import ActorPoolStrategy

    a = cfg.adapt
    if carry and carry.reused:
        dataset = blockio.read_not_carried(emb_files, carry)
    else:
        dataset = blockio.read(emb_files, min_blocks=a.num_actors * 4)
    return dataset.map_batches(
        PlaceActor, fn_constructor_kwargs={"placement_uri": placement_uri, "num_threads": int(a.cpus_per_actor)},
        batch_size=a.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=a.num_actors),
        num_cpus=a.cpus_per_actor,
    )
