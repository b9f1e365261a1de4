"""Top-k over HTTP on Ray Serve, through an index publication, reloaded when a new version is published.

    POST /  {"history": ["50", "172"], "k": 10}  ->  {"index": "<data dir>", "items": [{"item_id", "score"}, ...]}

Each replica watches the index manifest; a new version is loaded beside the one serving and swapped in
once whole, so no request waits for a reload or fails on one, and each answer names the version it came from.
`start` runs it on the local or configured Ray; on Kubernetes a RayService names `app` (k8s/render.py serve).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from llmemb_dist import layout, storage
from llmemb_dist.config import Config, ConfigError, load_config
from llmemb_dist.distributed.cluster import init_ray

log = logging.getLogger(__name__)
APP = "llmemb-topk"
MAX_K = 1000  # a request for more is refused: its answer would be a catalog dump, not a recommendation


@dataclass(frozen=True)
class Served:
    data_dir: str  # the index version's transaction folder
    recommender: object


def load(uri: str) -> Served:
    """The recommender of the index published at `uri`, with the version it is; again if one was published
    while it loaded."""
    from llmemb_dist.recommender import Recommender

    while True:
        manifest = storage.read_manifest(uri)
        recommender = Recommender.from_publication(manifest["inputs"]["rat"]["uri"], index=uri)
        if storage.read_manifest(uri)["data_dir"] == manifest["data_dir"]:
            return Served(manifest["data_dir"], recommender)


def request_of(body: object) -> tuple[list[str], int]:
    """The history and k of a request body; ValueError names what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("history"), list) or not body["history"]:
        raise ValueError('the body must be {"history": [item ids, oldest first], "k": 10}')
    k = body.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    return [str(item) for item in body["history"]], k


class TopK:
    """One replica: answers from the version loaded last, while a thread watches for the next."""

    def __init__(self, uri: str, watch_s: float):
        self.uri, self.watch_s = uri, watch_s
        self.served = load(uri)
        threading.Thread(target=self.watch, daemon=True).start()

    def watch(self) -> None:
        while True:
            time.sleep(self.watch_s)
            try:
                if storage.read_manifest(self.uri)["data_dir"] != self.served.data_dir:
                    self.served = load(self.uri)
                    log.info("now serving %s version %s", self.uri, self.served.data_dir)
            except (storage.StorageError, storage.DataError, FileNotFoundError) as e:
                # A version replaced while it loaded, a store out of reach: the one serving stays.
                log.warning("still serving %s version %s: %s", self.uri, self.served.data_dir, e)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        served = self.served  # one version for the whole request, whatever a reload swaps in meanwhile
        try:
            history, k = request_of(await request.json())
            top = served.recommender.top_k(history, k)
        except ValueError as e:  # a body that is not JSON, or an item the recommender does not know
            return JSONResponse({"error": str(e)}, status_code=400)
        return {"index": served.data_dir, "items": [{"item_id": item, "score": score} for item, score in top]}


def application(cfg: Config):
    """The top-k application over `layout.index_uri(cfg)`; its one deployment is named TopK."""
    from ray import serve as ray_serve

    return ray_serve.deployment(TopK).bind(layout.index_uri(cfg), cfg.index.serve_watch_s)


def app(args: dict):
    """The application builder a Ray Serve config names (`import_path: llmemb_dist.stages.index.serving:app`),
    with args {"config": <config file>, "overrides": [key=value, ...]} as a launch script takes them; the
    replicas and their CPUs are the Serve config's."""
    unknown = sorted(set(args) - {"config", "overrides"})
    if unknown or "config" not in args or not isinstance(args.get("overrides", []), list):
        raise ConfigError(f'the serve app\'s args must be {{"config": <file>, "overrides": [key=value, ...]}}, '
                          f"got {sorted(args)}")
    return application(load_config(args["config"], [str(o) for o in args.get("overrides", [])]))


def start(cfg: Config) -> str:
    """Starts (or updates) the app on Ray Serve for `layout.index_uri(cfg)`; returns its URL."""
    from ray import serve as ray_serve

    storage.read_manifest(layout.index_uri(cfg))  # an index that is not published is refused before Ray starts
    init_ray(cfg.ray, cfg.log.verbose)
    ray_serve.start(http_options={"host": cfg.index.serve_host, "port": cfg.index.serve_port})
    ray_serve.run(application(cfg), name=APP, route_prefix="/")
    return f"http://{cfg.index.serve_host}:{cfg.index.serve_port}/"


def serve(cfg: Config) -> None:
    """Serves until interrupted."""
    log.info("serving top-k of %s at %s", layout.index_uri(cfg), start(cfg))
    threading.Event().wait()
