"""What a user sees: a small pipeline, started as a user starts it, prints our lines and little else."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

TINY = ["model.max_length=32", "dataset.max_items=200", "dataset.num_shards=2", "scft.steps=4", "scft.batch_size=8",
        "scft.checkpoint_every=4", "scft.log_every=2", "embed.batch_size=32", "rat.epochs=3", "rat.patience=2",
        "rat.hidden=32", "rat.max_len=50"]
# A quiet run of this pipeline printed 54 lines (318 before it was quiet): stage lines, progress lines, the
# tables. One Ray Data progress block or Ray Train's per-report lines would take it past the bound.
MOST_LINES = 70


@pytest.mark.slow
def test_small_pipeline_prints_progress_and_little_else(tmp_path, tiny_llama_dir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, as on a laptop
    run = subprocess.run(
        [sys.executable, "launch/pipeline.py", "configs/default.yaml", f"root={tmp_path / 'runs'}",
         f"model.path={tiny_llama_dir}", *TINY],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    out = run.stdout
    lines = out.splitlines()
    assert run.returncode == 0, out[-5000:]
    assert len(lines) <= MOST_LINES, out
    assert "Traceback" not in out, out
    for loop in ("scft step", "rat sasrec-id epoch", "rat sasrec-llm_gate epoch"):
        assert any(loop in line and "ETA" in line for line in lines), f"no {loop!r} line with an ETA:\n{out}"
    assert any("embed 200/200 items" in line for line in lines), out
    # Ray Data's progress, Ray Train's per-report lines, transformers' load report; "site-packages" is in every
    # library warning's first line (our own warnings stay: they are ours to fix).
    for noise in ("Running Dataset", "execution finished", "Reporting training result", "Checkpoint successfully",
                  "PlacementGroupCleaner", "LOAD REPORT", "site-packages"):
        assert noise not in out, f"{noise!r} printed:\n{out}"
