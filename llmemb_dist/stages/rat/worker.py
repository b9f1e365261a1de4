"""Training one RAT model on Ray Train: the worker (resume, fit, checkpoint every epoch) and its driver call.

Checkpoints live under `<root>/rat/<run>/checkpoints/<variant>`; rerunning the same run resumes
there, and a variant that already finished is reused rather than retrained.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from llmemb_dist import layout, storage
from llmemb_dist.config import Config, RatConfig
from llmemb_dist.data.sequences import Sequences
from llmemb_dist.distributed import ray_train
from llmemb_dist.srs import SeqRecommender, build_model
from llmemb_dist.stages.rat.state import load_state, save_state
from llmemb_dist.stages.rat.trainer import FitResult, TrainState, fit
from llmemb_dist.tracking import StageRun

log = logging.getLogger(__name__)


@dataclass
class RatJob:
    """One model for the Ray Train workers to train: what, on which sequences and inputs."""

    rcfg: RatConfig
    backbone: str
    item_repr: str
    data: Sequences  # indices only
    llm: np.ndarray | None = None  # the LLM item table, row k - 1 for item k
    srs: np.ndarray | None = None  # the collaborative SASRec's item table, for the alignment loss
    fault_marker: str = ""  # written when rat.fail_at_step has fired, so the resumed run does not fail again

    @property
    def variant(self) -> str:
        return f"{self.backbone}-{self.item_repr}"


class InjectedFault(RuntimeError):
    """Raised once by rank 0 at rat.fail_at_step, to exercise recovery."""


# A checkpoint holds one of two things: "train", a TrainState to resume from, or "result", the FitResult of a
# finished run (numpy arrays as tensors: the checkpoint format stores tensors and JSON only).
TRAIN, RESULT = "train", "result"


def result_to_checkpoint(result: FitResult) -> dict:
    out = {**vars(result), "test_ranks": torch.from_numpy(result.test_ranks)}
    if result.without_text is not None:
        out["without_text"] = {**result.without_text, "test_ranks": torch.from_numpy(result.without_text["test_ranks"])}
    return {RESULT: out}


def result_from_checkpoint(saved: dict) -> FitResult:
    result = FitResult(**saved[RESULT])
    result.test_ranks = result.test_ranks.numpy()
    if result.without_text is not None:
        result.without_text = {**result.without_text, "test_ranks": result.without_text["test_ranks"].numpy()}
    return result


def train_worker(config: dict) -> None:
    """Ray Train worker: resume from the latest checkpoint, fit, report the result with done=True."""
    worker = ray_train.worker_info()
    rank = worker.rank
    job: RatJob = config["job"]
    torch.set_num_threads(max(1, int(job.rcfg.cpus_per_worker)))
    state = None
    with ray_train.restored_checkpoint() as folder:
        saved = None if folder is None else load_state(folder)
    if saved is not None and RESULT in saved:
        done = {"epoch": result_from_checkpoint(saved).epochs, "done": True}
        ray_train.report_restored(done) if rank == 0 else ray_train.report(done)
        return
    if saved is not None:
        state = TrainState(**saved[TRAIN])
        log.info("resuming %s at epoch %d", job.variant, state.epoch)

    def report(checkpoint: dict, metrics: dict) -> None:
        """Reports metrics; rank 0 also checkpoints (every rank holds the same DDP state)."""
        if rank != 0:
            ray_train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(checkpoint, d)
            ray_train.report(metrics, d)

    def fail_once(step: int) -> None:
        if step == job.rcfg.fail_at_step and rank == 0 and not storage.exists(job.fault_marker):
            storage.write_bytes(job.fault_marker, b"")
            raise InjectedFault(f"rat.fail_at_step: injected failure at step {step} of {job.variant}")

    data = job.data
    torch.manual_seed(job.rcfg.seed)  # rat.seed seeds the initial weights too: a rerun starts where its twin did
    model = build_model(job.rcfg, job.backbone, job.item_repr, data.num_items, job.llm, data.train_popularity())
    result = fit(model, data, job.rcfg, srs=job.srs, state=state,
                 on_epoch=lambda st: report({TRAIN: vars(st)}, {"epoch": st.epoch, **st.history[-1]}),
                 on_step=fail_once if job.rcfg.fail_at_step >= 0 else None,
                 rank=rank, world=worker.world, name=f"rat {job.variant}")
    report(result_to_checkpoint(result), {"epoch": result.epochs, "done": True})


def train_variant(cfg: Config, data: Sequences, backbone: str, item_repr: str, *,
                  llm: np.ndarray | None = None, srs: np.ndarray | None = None,
                  run: StageRun | None = None) -> tuple[SeqRecommender, FitResult]:
    """Trains (or resumes, or reuses) one model on Ray Train; returns it with its best weights, and its result.
    With `run`, every epoch's metrics are tracked as they are reported, named `<variant>/<metric>`."""
    job = RatJob(cfg.rat, backbone, item_repr, data.indices_only(), llm, srs,
                 fault_marker=storage.join(layout.rat_checkpoints_uri(cfg), f"{backbone}-{item_repr}.fault_injected"))
    log.info("training %s on %d workers", job.variant, job.rcfg.num_workers)
    trained = ray_train.run_training(
        train_worker, {"job": job},
        name=job.variant, storage_uri=layout.rat_checkpoints_uri(cfg),
        num_workers=job.rcfg.num_workers, cpus_per_worker=job.rcfg.cpus_per_worker,
        max_failures=job.rcfg.max_failures, on_report=run and run.steps("epoch", f"{job.variant}/"),
    )
    with ray_train.result_checkpoint(trained, f"RAT training of {job.variant}") as folder:
        saved = load_state(folder)
    if RESULT not in saved:
        raise storage.DataError(f"RAT training of {job.variant}: its last checkpoint holds no finished result; "
                                "choose another rat.run to train afresh")
    result = result_from_checkpoint(saved)
    model = build_model(job.rcfg, backbone, item_repr, data.num_items, llm)
    model.load_state_dict(result.best_state)
    model.text_weight = result.text_weight
    model.eval()
    return model, result
