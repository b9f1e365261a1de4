"""Stage 5, index: an adapted version gives `<root>/index/<version>/`, a FAISS index over every item's vector
exactly as the recommender scores it (the text channel's columns included), for top-k serving through
`api.Recommender.from_publication(..., index=...)`.

The index is checked before it is published: recall@10 against exact search for a seeded sample of
validation users, recorded in the manifest with the build time. A rerun with the same inputs and
parameters does nothing; with `index.replace` other inputs or parameters are published over the same
version, which a serving app (launch/serve.py) watches and reloads. With `index.incremental_from` an IVF
index of a previous version is updated rather than built (incremental.py).
"""
from __future__ import annotations

import logging
import time

from llmemb_dist import layout, storage, tracking
from llmemb_dist.config import Config, config_hash, to_dict
from llmemb_dist.data import index_files
from llmemb_dist.stages.index import incremental, kinds, users

log = logging.getLogger(__name__)
ITEMS = "item_embeddings"  # the adapted version's table
K = 10  # the cut-off of the recall check: the top 10 a recommender shows


def index(cfg: Config) -> str:
    """Publishes the index over `layout.index_input_adapted_uri(cfg)`; returns its URI."""
    from llmemb_dist.recommender import Recommender

    out_uri, adapted_uri = layout.index_uri(cfg), layout.index_input_adapted_uri(cfg)
    adapted = storage.read_manifest(adapted_uri)
    rat_uri, rat = rat_of(adapted_uri, adapted)
    items = adapted["tables"][ITEMS]["rows"]
    params = {**kinds.resolve(cfg.index, items, adapted_uri), "recall_users": cfg.index.recall_users,
              "recall_seed": cfg.index.seed}
    inputs = {"adapted": {"uri": adapted_uri, "data_dir": adapted["data_dir"]},
              "rat": {"uri": rat_uri, "data_dir": rat["data_dir"]}}
    if storage.already_published(out_uri, {"inputs": inputs, "index": params}, "item index",
                                 differs="other inputs or index parameters", replace=cfg.index.replace,
                                 hint="choose another index.version, or pass index.replace=true"):
        return out_uri

    recommender = Recommender.from_publication(rat_uri, items=adapted_uri)
    vectors = recommender.item_vectors[1:].numpy()
    log.info("indexing %d items of %s (%d dimensions) as %s", items, adapted_uri, vectors.shape[1], params)
    started = time.perf_counter()
    made = incremental.make(cfg, params, recommender.item_ids, vectors)
    build_s = time.perf_counter() - started
    histories = users.validation_histories(rat_uri, rat, set(recommender.item_ids), cfg.index.recall_users,
                                           cfg.index.seed)
    queries = users.user_vectors(recommender, histories)
    _, found = made.index.search(queries, K)
    found = index_files.rows_of(found, index_files.label_rows(made.labels))
    recall = kinds.recall(found, kinds.exact_top(queries, vectors, K))
    figures = {"items": items, "dim": int(vectors.shape[1]), "build_seconds": build_s, "recall_at_10": recall,
               "recall_users": len(histories)}
    log.info("%s in %.1f s; recall@10 against exact search %.4f over %d validation users",
             "updated" if made.build["mode"] == "incremental" else "built", build_s, recall, len(histories))
    with tracking.stage_run(cfg, "index", cfg.index.version) as run, storage.publish(
            out_uri, kind="index", config=to_dict(cfg), config_hash=config_hash(cfg.index), inputs=inputs,
            overwrite=cfg.index.replace) as pub:
        index_files.write(pub, made.index, made.labels, recommender.item_ids)
        pub.info.update(index=params, text_weight=recommender.model.text_weight, build=made.build,
                        quantizer=made.quantizer, **figures)
        run.log_final(figures)
        run.publish(pub)
    log.info("published %s", out_uri)
    return out_uri


def rat_of(adapted_uri: str, adapted: dict) -> tuple[str, dict]:
    """The RAT result an adapted version was made with, and its manifest, refused if it was republished since."""
    if adapted.get("kind") != "adapted":
        raise storage.DataError(f"{adapted_uri}: not an adapted version (its kind is {adapted.get('kind')!r})")
    made_with = adapted["inputs"]["rat"]
    rat = storage.read_manifest(made_with["uri"])
    if rat["data_dir"] != made_with["data_dir"]:
        raise storage.DataError(f"{adapted_uri}: adapted with {made_with['uri']} ({made_with['data_dir']}), which has "
                                f"been republished since ({rat['data_dir']}): adapt again, then index")
    return made_with["uri"], rat
