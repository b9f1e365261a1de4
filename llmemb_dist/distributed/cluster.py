"""Connecting to Ray: an existing cluster when one is named, else an embedded local one."""
from __future__ import annotations

import os

from llmemb_dist.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        # address="local": a stale `ray start` session file must not make us connect to a dead cluster.
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False)
