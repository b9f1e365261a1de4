"""Connecting to Ray: an existing cluster when one is named, else an embedded local one."""
from __future__ import annotations

import logging
import os
import sys

from llmemb_dist.config import ConfigError, RayConfig
from llmemb_dist.distributed.logs import QUIET_ENV, quiet_process


def init_ray(cfg: RayConfig, verbose: bool = False) -> None:
    """Starts or joins Ray; unless `verbose`, Ray and the libraries in its processes print only warnings."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # whoever started Ray chose what it prints
    options = {"runtime_env": {"worker_process_setup_hook": f"{__name__}.{find_own_cluster.__name__}"}}
    if not verbose:
        # Variables set already (a user's, a Ray job's) stay as they are, and in the job's runtime env they
        # would clash with the same ones of ours.
        env = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
        os.environ.update(env)  # before `import ray`: Ray reads some of them as it loads
        import ray.data

        quiet_process()
        ray.data.DataContext.get_current().enable_progress_bars = False
        options = {"logging_level": logging.WARNING,
                   "runtime_env": {"env_vars": env, "worker_process_setup_hook": f"{__name__}.{quiet_worker.__name__}"}}
    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **options)
    else:
        # address="local": a stale `ray start` session file must not make us connect to a dead cluster.
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False, **options)


def find_own_cluster() -> None:
    """Every Ray worker process of our jobs runs this first. Ray's State API client, which Ray Train's placement
    group cleaner asks whether the run's controller lives, finds its cluster by RAY_ADDRESS; without it, it
    dies with a traceback on a machine that runs other Ray clusters too."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_worker() -> None:
    find_own_cluster()
    quiet_process()


def check_actor_pool(num_actors: int, cpus_per_actor: float, stage: str) -> None:
    """Fails at once when an actor pool would leave the cluster no whole CPU: Ray Data's file listing, read and
    write tasks each need one beside the actors, and without it the job waits forever without a word. An
    autoscaling cluster may still grow, so there the check stands aside."""
    import ray
    from ray._private.state import state  # what Ray Train's own autoscaler check reads

    if state.get_max_resources_from_cluster_config():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    if total - num_actors * cpus_per_actor < 1:
        raise ConfigError(
            f"{stage}.num_actors={num_actors} x {stage}.cpus_per_actor={cpus_per_actor:g} takes "
            f"{num_actors * cpus_per_actor:g} of this Ray cluster's {total:g} CPUs and leaves no whole CPU for Ray "
            f"Data's reads and writes, which would wait forever: use fewer actors or a fractional "
            f"{stage}.cpus_per_actor, or add CPUs")
