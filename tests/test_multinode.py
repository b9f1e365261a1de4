"""Multi-node behaviour on one machine: a Ray cluster of a head and two worker nodes that share
nothing but the moto S3 server, a node lost mid-run, and a request the cluster cannot host.

The model is uploaded to S3 and named by its s3:// URI, so every node fetches it into its own
cache folder (conftest.MultiNode); nothing relies on a path that exists on only one node.
The run goes on a background thread while the test's thread removes a node once storage
shows the run past a point reached mid-run by construction (a registered checkpoint, model
replicas loading), and the tests assert only what must then hold, whatever the exact moment.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from llmemb_dist import storage
from llmemb_dist.config import Config, load_config
from llmemb_dist.distributed.ray_train import InsufficientResources, run_training
from llmemb_dist.layout import adapter_uri, dataset_uri, embeddings_uri, scft_run_uri
from llmemb_dist.stages.embed.driver import embed
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.scft.driver import scft

from test_embed import assert_matches, reference_vectors

WAIT_S = 300  # for a point of a run to show in storage; far beyond what it takes, short of a hang


def model_uri(root: str, model_dir: Path) -> str:
    uri = storage.join(root, "models", model_dir.name)
    storage.upload_dir(model_dir, uri)
    return uri


def make_cfg(root: str, model: str, driver_cache: Path, *overrides: str) -> Config:
    # LoRA dropout stays on (0.1): a resumed run must draw the same masks as an uninterrupted one.
    return load_config(None, [
        f"root={root}", "dataset.num_shards=2", f"model.path={model}", f"model.cache_dir={driver_cache}",
        "model.max_length=48", *overrides,
    ])


def scft_cfg(root: str, model: str, driver_cache: Path, run: str) -> Config:
    # One 2-CPU worker per 3-CPU node; 8 steps with checkpoints at 4 and 8.
    return make_cfg(
        root, model, driver_cache, "dataset.max_items=64", f"scft.run={run}",
        "scft.num_workers=2", "scft.cpus_per_worker=2", "scft.zero_stage=3", "scft.max_failures=2",
        "scft.batch_size=8", "scft.steps=8", "scft.checkpoint_every=4",
        "scft.lr=0.002", "scft.temperature_init=0.1", "scft.augmentation=reference",
    )


def holds_model(cache: Path) -> bool:
    return any(cache.glob("*/config.json"))


class Background(threading.Thread):
    """Runs a stage on another thread: Ray can add a node only from the main thread."""

    def __init__(self, fn: Callable, *args):
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result, self.error = None, None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - raised again by outcome() on the test's thread
            self.error = e

    def outcome(self):
        self.join(timeout=WAIT_S)
        assert not self.is_alive(), "the run did not finish after the node was replaced"
        if self.error:
            raise self.error
        return self.result


@dataclass
class NodeLoss:
    unpublished: bool  # the output was not yet published when the node went: the loss was mid-run
    replacement: object


def lose_a_node(nodes, run: Background, ready: Callable[[], bool], published_uri: str) -> NodeLoss:
    """Once `ready()`, removes a worker node (its raylet and every process on it) and adds a fresh one."""
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert run.is_alive(), f"the run ended before the point where a node is to be lost: {run.error!r}"
        assert time.monotonic() < deadline, "the run never reached the point where a node is to be lost"
        time.sleep(0.2)
    unpublished = not storage.is_published(published_uri)
    nodes.remove_node(nodes.workers[0])
    return NodeLoss(unpublished, nodes.add_node())


def published_metrics(cfg: Config) -> list[dict]:
    import json

    text = storage.read_bytes(storage.join(storage.data_uri(adapter_uri(cfg)), "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def published_adapter(cfg: Config, tmp: Path) -> dict[str, torch.Tensor]:
    local = storage.download_dir(storage.join(storage.data_uri(adapter_uri(cfg)), "adapter"), tmp)
    return load_file(local / "adapter_model.safetensors")


@pytest.mark.slow
def test_scft_zero3_loses_a_node_resumes_from_s3_and_equals_an_uninterrupted_run(ray_multinode, s3_root, tiny_llama_dir, tmp_path):
    nodes = ray_multinode
    model = model_uri(s3_root, tiny_llama_dir)
    steady = scft_cfg(s3_root, model, tmp_path / "driver-cache", run="steady")
    prepare(steady)
    scft(steady)
    # Each node fetched the model from S3 into its own cache, and so did the driver.
    assert all(holds_model(nodes.caches[n.node_id]) for n in nodes.workers)
    assert holds_model(tmp_path / "driver-cache")

    lossy = scft_cfg(s3_root, model, tmp_path / "driver-cache", run="lossy")
    # Ray Train writes its snapshot once the first checkpoint (step 4 of 8) is registered.
    snapshot = storage.join(scft_run_uri(lossy), "checkpoints", "checkpoint_manager_snapshot.json")
    run = Background(scft, lossy)
    run.start()
    loss = lose_a_node(nodes, run, lambda: storage.exists(snapshot), adapter_uri(lossy))
    run.outcome()

    assert loss.unpublished
    # A worker restarted on the new node: it fetched the model from S3 and the state from the checkpoint.
    assert holds_model(nodes.caches[loss.replacement.node_id])
    manifest = storage.read_manifest(adapter_uri(lossy))
    assert manifest["steps"] == 8
    metrics, expected = published_metrics(lossy), published_metrics(steady)
    assert [m["step"] for m in metrics] == list(range(1, 9))  # every step once
    # Resumed at the checkpoint's exact step, with its optimizer state and data order: each
    # step's loss, and the adapter, are the uninterrupted run's.
    torch.testing.assert_close([m["loss"] for m in metrics], [m["loss"] for m in expected], rtol=1e-4, atol=1e-5)
    got, want = published_adapter(lossy, tmp_path / "lossy"), published_adapter(steady, tmp_path / "steady")
    assert got.keys() == want.keys() and any("lora_B" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # trained, not the zero init


@pytest.mark.slow
def test_embedding_with_one_actor_per_node_survives_a_node_loss(ray_multinode, s3_root, tiny_llama_dir, tmp_path):
    nodes = ray_multinode
    cfg = make_cfg(
        s3_root, model_uri(s3_root, tiny_llama_dir), tmp_path / "driver-cache", "dataset.max_items=400",
        "embed.adapter=none", "embed.num_actors=2", "embed.cpus_per_actor=2", "embed.batch_size=2",
        "embed.rows_per_file=25",
    )
    prepare(cfg)
    caches = [nodes.caches[n.node_id] for n in nodes.workers]
    # Both replicas are loading the model: the job has started and has all its work ahead.
    run = Background(embed, cfg)
    run.start()
    loss = lose_a_node(nodes, run, lambda: all(holds_model(c) for c in caches), embeddings_uri(cfg))
    uri = run.outcome()

    assert loss.unpublished
    assert holds_model(nodes.caches[loss.replacement.node_id])  # the lost actor was restarted there
    catalog = storage.read_table(dataset_uri(cfg), "catalog")
    assert storage.read_manifest(uri)["counts"]["items"] == catalog.num_rows == 400
    assert_matches(uri, reference_vectors(cfg, catalog), catalog)  # every item exactly once, right vectors


def _never_runs(config: dict) -> None:
    raise AssertionError("no worker should start")


def test_more_workers_than_the_nodes_can_host_is_a_clear_error_not_a_wait(ray_multinode, s3_root):
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            run_training(_never_runs, {}, name="too-big", storage_uri=s3_root, num_workers=3, cpus_per_worker=2)
        except BaseException as e:  # noqa: BLE001 - examined below
            outcome.append(e)

    # Without the check Ray Train would wait for the placement group forever; a thread keeps
    # a regression from hanging the suite.
    caller = threading.Thread(target=ask, daemon=True)
    caller.start()
    caller.join(timeout=WAIT_S)
    assert not caller.is_alive(), "run_training waited for resources the cluster does not have"
    # 6 CPUs in all, but a 2-CPU worker fits only once on each 3-CPU node.
    assert len(outcome) == 1 and isinstance(outcome[0], InsufficientResources)
    assert re.search(r"3 workers of \{'CPU': 2(\.0)?\} each do not fit .* can host 2;", str(outcome[0]))


@pytest.mark.slow
def test_rat_on_two_nodes_reaches_the_validation_quality_of_one_worker(ray_multinode, s3_root):
    """DDP over one 2-CPU worker per node (they share only S3) against one worker, on ml-100k: the
    difference stays within what two seeds of the single worker differ by."""
    from llmemb_dist.stages.rat.inputs import load_sequences
    from llmemb_dist.stages.rat.worker import train_variant

    base = [f"root={s3_root}", "rat.max_len=30", "rat.hidden=64", "rat.dropout=0.2", "rat.lr=0.003", "rat.epochs=8",
            "rat.patience=8", "rat.cpus_per_worker=2"]
    cfg = load_config(None, base)
    prepare(cfg)
    data = load_sequences(cfg)

    def valid_ndcg(*overrides: str) -> float:
        _, result = train_variant(load_config(None, base + list(overrides)), data, "sasrec", "id")
        return result.valid["full"]["overall"]["NDCG@10"]

    one, other_seed = valid_ndcg("rat.run=one"), valid_ndcg("rat.run=seed2", "rat.seed=7")
    two = valid_ndcg("rat.run=two", "rat.num_workers=2")
    assert two > 0.02  # it learned: most-popular scores about 0.02 here
    assert abs(two - one) <= max(3 * abs(one - other_seed), 0.01), (one, other_seed, two)
