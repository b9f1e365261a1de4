"""Starting Ray Train runs whose checkpoints live in our storage (a local folder or S3)."""
from __future__ import annotations

from typing import Any, Callable

from llmemb_dist import storage


def run_training(
    train_fn: Callable[[dict], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    storage_uri: str,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    datasets: dict | None = None,
    dataset_config: Any = None,
):
    """Runs `train_fn` on `num_workers` Ray Train workers; returns the Ray Train Result.

    Rerunning with the same `name` and `storage_uri` resumes: `ray.train.get_checkpoint()`
    then returns the latest checkpoint inside `train_fn`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_cluster_fits(num_workers, {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})})
    fs, path = storage.resolve(storage_uri)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    return trainer.fit()


class InsufficientResources(RuntimeError):
    """The cluster's nodes cannot host the workers asked for."""


def check_cluster_fits(num_workers: int, resources_per_worker: dict[str, float]) -> None:
    """Fails at once when the live nodes cannot host `num_workers` workers.

    Ray Train waits for a placement group that cannot be placed forever (it retries the
    worker group start every 60 s), so a run asking for more than the cluster has would
    hang without a word. A worker must fit on one node: 3 workers of 2 CPUs do not fit
    on 2 nodes of 3 CPUs, though the 6 CPUs add up. An autoscaling cluster may still grow:
    there Ray Train checks against its configured maximum itself, and this check stands aside.
    """
    import ray
    from ray._private.state import state  # what Ray Train's own (autoscaler-only) check reads

    if state.get_max_resources_from_cluster_config():
        return
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    needed = {k: v for k, v in resources_per_worker.items() if v > 0}
    fits = sum(min((int(node.get(k, 0) // v) for k, v in needed.items()), default=num_workers) for node in nodes)
    if fits < num_workers:
        hosts = ", ".join(
            "{" + ", ".join(f"{k}: {node.get(k, 0):g}" for k in resources_per_worker) + "}" for node in nodes
        )
        raise InsufficientResources(
            f"{num_workers} workers of {resources_per_worker} each do not fit on this Ray cluster: its "
            f"{len(nodes)} live nodes ({hosts}) can host {fits}; lower num_workers or the resources per "
            "worker, or add nodes"
        )
