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
):
    """Runs `train_fn` on `num_workers` Ray Train workers; returns the Ray Train Result.

    Rerunning with the same `name` and `storage_uri` resumes: `ray.train.get_checkpoint()`
    then returns the latest checkpoint inside `train_fn`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
    )
    return trainer.fit()
