"""Checkpoints hold tensors as safetensors and the rest as JSON: they round-trip exactly, and a pickle
payload planted where a checkpoint is read never runs."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.sequences import bucketed_batches, train_inputs
from llmemb_dist.distributed.engine import (
    CHECKPOINT_TAG, DIGESTS, KEY_ENV, CheckpointTampered, verify_checkpoint, write_digests,
)
from llmemb_dist.layout import rat_checkpoints_uri
from llmemb_dist.srs import build_model
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.inputs import load_sequences
from llmemb_dist.stages.rat.state import load_state, save_state
from llmemb_dist.stages.rat.worker import train_variant

from conftest import Payload, start_local_ray


def plant(folder: Path, marker: Path) -> None:
    (folder / "state.pt").write_bytes(pickle.dumps(Payload(marker)))


def test_rat_state_round_trips_exactly_and_training_continues_bit_for_bit(tmp_path):
    cfg = load_config(None, ["rat.hidden=8", "rat.adapter_hidden=12", "rat.max_len=5", "rat.item_repr=llm_gate"])
    torch.manual_seed(0)
    model = build_model(cfg.rat, "sasrec", "llm_gate", 20, np.random.default_rng(0).normal(size=(20, 16)), np.arange(21))
    model.eval()  # no dropout: the two continuations must draw nothing at random
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)

    def step() -> None:
        loss = model.user_repr(torch.tensor([[1, 2, 3], [0, 4, 5]])).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    state = {"epoch": 1, "best_score": float("nan"), "history": [{"epoch": 1, "loss": 0.5}], "valid": {"full": {}},
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "done": False}
    save_state(state, tmp_path)
    loaded = load_state(tmp_path)
    assert loaded["epoch"] == 1 and loaded["history"] == state["history"] and np.isnan(loaded["best_score"])
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])  # Adam's per-parameter state has integer keys
    step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_a_planted_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "payload-ran"
    old = tmp_path / "old"
    old.mkdir()
    plant(old, marker)  # a checkpoint in the old pickled form only: refused, not loaded
    with pytest.raises(storage.DataError, match="not a RAT checkpoint of this version"):
        load_state(old)
    good = tmp_path / "good"
    good.mkdir()
    save_state({"epoch": 2, "weights": torch.ones(3)}, good)
    plant(good, marker)  # beside a real checkpoint: ignored
    assert load_state(good)["epoch"] == 2
    (good / "state.json").write_text("{not json")
    with pytest.raises(storage.DataError, match="unreadable RAT checkpoint"):
        load_state(good)
    assert not marker.exists()


@pytest.mark.slow
def test_rat_reads_its_checkpoints_and_a_payload_planted_in_them_never_runs(tmp_path, s3_server):
    start_local_ray()
    settings = [f"root={tmp_path / 'runs'}", "dataset.max_items=60", "rat.max_len=20", "rat.hidden=16", "rat.patience=5",
                "rat.eval.num_negatives=20"]
    cfg = load_config(None, settings + ["rat.epochs=2"])
    prepare(cfg)
    data = load_sequences(cfg)
    _, first = train_variant(cfg, data, "sasrec", "id")
    marker = tmp_path / "payload-ran"
    checkpoints = [p for p in (tmp_path / "runs" / "rat").rglob("checkpoint_*") if p.is_dir()]
    assert checkpoints
    for folder in checkpoints:
        plant(folder, marker)
    # The same run again: Ray Train hands the worker the latest checkpoint, finished, which is reused as it is.
    model, again = train_variant(cfg, data, "sasrec", "id")
    assert again.history == first.history and again.best_epoch == first.best_epoch
    assert not marker.exists()


def deepspeed_like_checkpoint(folder: Path, rank_files: dict[int, list[str]]) -> None:
    for rank, names in rank_files.items():
        for name in names:
            path = folder / CHECKPOINT_TAG / name
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"rank": rank, "weights": torch.ones(2)}, path)
        write_digests_of(folder, rank, names)


def write_digests_of(folder: Path, rank: int, names: list[str]) -> None:
    """What a rank's own folder held when it saved: only its files (the ranks' folders merge on upload)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as own:
        for name in names:
            (Path(own) / CHECKPOINT_TAG).mkdir(exist_ok=True)
            shutil.copy(folder / CHECKPOINT_TAG / name, Path(own) / CHECKPOINT_TAG / name)
        write_digests(own, rank)
        shutil.copy(Path(own) / DIGESTS.format(rank=rank), folder / DIGESTS.format(rank=rank))


def test_deepspeed_checkpoints_are_verified_before_anything_is_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    files = {0: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_optim_states.pt"], 1: ["zero_pp_rank_1_optim_states.pt"]}
    folder = tmp_path / "ckpt"
    deepspeed_like_checkpoint(folder, files)
    verify_checkpoint(folder)  # every rank's files, each vouched for by its own record

    replaced = folder / CHECKPOINT_TAG / "zero_pp_rank_1_optim_states.pt"
    original = replaced.read_bytes()
    replaced.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointTampered, match="differs from the digests"):
        verify_checkpoint(folder)
    replaced.write_bytes(original)
    plant(folder / CHECKPOINT_TAG, marker)
    with pytest.raises(CheckpointTampered, match="is not in the digests"):
        verify_checkpoint(folder)
    (folder / CHECKPOINT_TAG / "state.pt").unlink()

    # With a key, a record rewritten by someone without it is refused too.
    monkeypatch.setenv(KEY_ENV, "secret")
    signed = tmp_path / "signed"
    deepspeed_like_checkpoint(signed, files)
    verify_checkpoint(signed)
    replaced = signed / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
    replaced.write_bytes(pickle.dumps(Payload(marker)))
    monkeypatch.delenv(KEY_ENV)
    write_digests_of(signed, 0, files[0])  # the forger re-digests the files, but has no key
    monkeypatch.setenv(KEY_ENV, "secret")
    with pytest.raises(CheckpointTampered, match="signature does not match"):
        verify_checkpoint(signed)
    assert not marker.exists()


@pytest.mark.slow
def test_rat_killed_mid_epoch_resumes_to_the_result_of_an_uninterrupted_run(tmp_path, s3_server):
    start_local_ray()
    settings = [f"root={tmp_path / 'runs'}", "dataset.max_items=60", "rat.max_len=20", "rat.hidden=16", "rat.epochs=4",
                "rat.patience=5", "rat.batch_size=16", "rat.eval.num_negatives=20"]
    cfg = load_config(None, settings + ["rat.run=whole"])
    prepare(cfg)
    data = load_sequences(cfg)
    _, whole = train_variant(cfg, data, "sasrec", "id")
    lengths = np.array([len(q) for q in train_inputs(data, cfg.rat.max_len) if len(q) >= 2])
    steps = len(bucketed_batches(lengths, cfg.rat.batch_size, np.random.default_rng([cfg.rat.seed, 0])))
    assert 9 % steps and 9 < 4 * steps  # the fault below strikes inside an epoch, not between two
    killed = load_config(None, settings + ["rat.run=killed", "rat.fail_at_step=9", "rat.max_failures=1"])
    _, resumed = train_variant(killed, data, "sasrec", "id")
    assert storage.exists(storage.join(rat_checkpoints_uri(killed), "sasrec-id.fault_injected"))  # it did fail

    def timeless(history):
        return [{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in history]

    assert timeless(resumed.history) == timeless(whole.history)
    assert resumed.test == whole.test and (resumed.test_ranks == whole.test_ranks).all()
    assert all(torch.equal(resumed.best_state[k], v) for k, v in whole.best_state.items())
