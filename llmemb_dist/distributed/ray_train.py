"""Ray Train, both sides: the driver starts runs whose checkpoints live in our storage (a local folder
or S3); a worker asks here for its rank, its dataset shard, the checkpoint it resumes from, and
reports metrics with or without a checkpoint folder. Stage code never imports ray.train.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

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
    worker_datasets: dict | None = None,
    on_report: Callable[[dict], None] | None = None,
):
    """Runs `train_fn` on `num_workers` Ray Train workers; returns the Ray Train Result.

    `on_report` (picklable) receives rank 0's metrics of every report as it arrives, in Ray Train's
    controller: a process of its own on the driver's node, not the driver.

    `worker_datasets` are Ray Data datasets the caller has already split, one per worker: each
    worker reads the one it names (`dataset_shard`) whole, and Ray Train must not split them again.

    Rerunning with the same `name` and `storage_uri` resumes: `ray.train.get_checkpoint()`
    then returns the latest checkpoint inside `train_fn`.
    """
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig,
                           WorkerGroupError)
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
            # Its controller's and workers' own lines at the level the driver gave Ray's (cluster.init_ray).
            logging_config=LoggingConfig(logging.getLevelName(logging.getLogger("ray").getEffectiveLevel())),
            callbacks=[_report_callback(on_report)] if on_report else None,
        ),
        datasets=worker_datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    try:
        return trainer.fit()
    except WorkerGroupError as e:
        # A worker that found its input or its training unusable said so in one line: that line, not
        # Ray Train's report of the failed worker group, is the run's error.
        for failure in e.worker_failures.values():
            if isinstance(failure, storage.DataError):
                raise failure.with_traceback(None) from None
        raise


def _report_callback(on_report: Callable[[dict], None]):
    """Ray Train's own hook for reports, built here so that ray.train loads only when a run starts."""
    from ray.train import UserCallback

    class OnReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            on_report(metrics[0])

    return OnReport()


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


# ---------------------------------------------------------------- inside a worker


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world: int


def worker_info() -> WorkerInfo:
    import ray.train

    ctx = ray.train.get_context()
    return WorkerInfo(ctx.get_world_rank(), ctx.get_world_size())


def dataset_shard(name: str) -> pa.Table:
    """The whole Ray Data shard passed to the run as `datasets[name]`, read into one table."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return pa.concat_tables(list(shard.iter_batches(batch_format="pyarrow", batch_size=None)))


@contextmanager
def restored_checkpoint() -> Iterator[Path | None]:
    """The folder of the run's latest checkpoint when the worker resumes, else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def report(metrics: dict[str, Any], checkpoint_folder: str | Path | None = None, *, folder_name: str | None = None) -> None:
    """Reports this step's metrics; with a folder, every rank's files in it join one checkpoint."""
    import ray.train

    checkpoint = None if checkpoint_folder is None else ray.train.Checkpoint.from_directory(str(checkpoint_folder))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder_name)


def report_restored(metrics: dict[str, Any]) -> None:
    """Reports the restored checkpoint again as the run's latest (a finished run that was resumed)."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.get_checkpoint())


@contextmanager
def result_checkpoint(result, what: str) -> Iterator[Path]:
    """The folder of a finished run's last checkpoint (on the driver); an error naming `what` if it left none."""
    if result.checkpoint is None:
        raise RuntimeError(f"{what} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        yield Path(folder)


def result_checkpoint_name(result) -> str:
    """The name of a finished run's last checkpoint folder inside the run's storage."""
    return Path(result.checkpoint.path).name
