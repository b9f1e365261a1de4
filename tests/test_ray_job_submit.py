"""`ray job submit -- python launch/scft.py ...` against a head started with `ray start --head`."""
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.stages.prepare.driver import prepare

from conftest import REPO, free_port

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head():
    """A separate Ray head on free ports (another local Ray may be running in this test process)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")}
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp_dir]
    cmd += [f"--{name}={port}" for name, port in ports.items()]
    # Ray 2.60 turns token authentication on: the head writes ~/.ray/auth_token, and the client
    # must set RAY_AUTH_MODE=token to send it.
    # The entrypoint's `python` is looked up on the head's PATH: put this environment's first, as
    # activating the virtual environment before `ray start` would.
    # On SIGTERM a head first drains for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s), for Serve's
    # proxies, which this head does not run: 0 tears it down at once.
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(3)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail(f"the Ray head did not come up: {(Path(temp_dir) / 'head.log').read_text()[-2000:]} {probe.stderr[-2000:]}")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # `ray stop` would also stop the test session's own local Ray
    head.wait(timeout=60)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_scft(ray_head, tmp_path, tiny_llama_dir):
    address, env = ray_head
    root = tmp_path / "runs"
    overrides = [f"root={root}", f"model.path={tiny_llama_dir}", "dataset.max_items=64", "scft.steps=2",
                 "scft.num_workers=1", "scft.batch_size=4", "scft.checkpoint_every=2", "model.max_length=32"]
    prepare(load_config(REPO / "configs" / "default.yaml", overrides))
    # The entrypoint runs on the head in the head's Python environment; --working-dir ships this checkout.
    out = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "launch/scft.py", "configs/default.yaml", *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = storage.read_manifest(str(root / "scft" / "default" / "adapter"))
    assert manifest["kind"] == "scft_adapter" and manifest["steps"] == 2
