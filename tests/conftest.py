"""Real components for the tests: a moto S3 server on loopback, a local Ray cluster, tiny models."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs of every stage are tracked by default; the tests' go to a folder of their own, not ./mlruns.
os.environ.setdefault("MLFLOW_TRACKING_URI", tempfile.mkdtemp(prefix="llmemb-test-mlruns-"))

REPO = Path(__file__).resolve().parent.parent


def real_dataset(name: str) -> Path:
    """A real dataset's folder (llmemb_dist/data/real.py); the calling test skips, naming the setting, where
    it is absent, and fails instead where $LLMEMB_REQUIRE_DATA says it must be there (CI)."""
    from llmemb_dist.data import real

    folder = real.real_dataset(name)
    if folder is None:
        (pytest.fail if real.required() else pytest.skip)(real.missing_reason(name))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server in its own process; the AWS variables point every process of the session at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh bucket for one test, as a storage root URI."""
    from llmemb_dist.storage import s3_client

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


_ray_started: dict[str, object] = {"kind": None}


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def start_local_ray():
    """The local Ray cluster shared by the tests (started once; again after a multi-node test replaced it)."""
    import ray

    if _ray_started["kind"] != "local" or not ray.is_initialized():
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        _ray_started["kind"] = "local"
    return ray


@pytest.fixture
def ray_local(s3_server):
    """The shared local Ray cluster. It starts after the S3 variables are set, so its workers inherit them.
    Never shut it down in a test."""
    return start_local_ray()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from llmemb_dist.llm.loading import shipped_model_path

    return shipped_model_path("minilm")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_dir) -> Path:
    """A small random Llama saved with save_pretrained; it borrows MiniLM's tokenizer (no download)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- multi-node Ray (tests/test_multinode.py)

NODE_CACHE_ENV = "LLMEMB_CACHE_DIR"  # llm/loading.py: a node's own model cache, over model.cache_dir


class MultiNode:
    """A Ray cluster of one driver-only head and worker nodes, all on this machine.

    Each worker node has `cpus` logical CPUs and its own cache folder (the variable every
    process it starts inherits), so nothing a node downloads is visible to another: as on
    separate machines, the moto S3 server is the only state they share.
    """

    def __init__(self, cluster, cache_root: Path, cpus: int):
        self.cluster, self.cache_root, self.cpus = cluster, cache_root, cpus
        self.caches: dict[str, Path] = {}  # node id -> its cache folder

    def add_node(self):
        cache = self.cache_root / f"node-{len(self.caches)}"
        node = self.cluster.add_node(num_cpus=self.cpus, env_vars={NODE_CACHE_ENV: str(cache)})
        self.cluster.wait_for_nodes()
        self.caches[node.node_id] = cache
        return node

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node)
        self.cluster.wait_for_nodes()

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)


@pytest.fixture
def ray_multinode(s3_server, tmp_path):
    """A head with no CPUs (it hosts only the driver's helpers, as a KubeRay head with num-cpus 0)
    and two worker nodes of 3 CPUs: a 2-CPU Ray Train worker or embedding actor fits once per node.

    It replaces the session's local Ray, and is shut down after the test, so the next test that
    asks for `ray_local` starts a fresh one.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    _ray_started["kind"] = "multinode"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = MultiNode(cluster, tmp_path / "node-caches", cpus=3)
    try:
        for _ in range(2):
            nodes.add_node()
        ray.init(address=cluster.address, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        _ray_started["kind"] = None


class Payload:
    """Unpickling this creates `marker`: the stand-in for code an attacker would plant in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")
