"""Training one RAT model on Ray Train: the worker (resume, fit, checkpoint every epoch) and its driver call.

Checkpoints live under `<root>/rat/<run>/checkpoints/<variant>`; rerunning the same run resumes
there, and a variant that already finished is reused rather than retrained.
"""
from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch

from llmemb_dist import layout
from llmemb_dist.config import Config, RatConfig
from llmemb_dist.data.sequences import Sequences
from llmemb_dist.distributed import ray_train
from llmemb_dist.srs import SeqRecommender, build_model
from llmemb_dist.stages.rat.state import load_state, save_state
from llmemb_dist.stages.rat.trainer import fit
from llmemb_dist.tracking import StageRun

log = logging.getLogger(__name__)


def train_worker(config: dict) -> None:
    """Ray Train worker: resume from the latest checkpoint, fit, report the final state with done=True."""
    worker = ray_train.worker_info()
    rank = worker.rank
    rcfg: RatConfig = config["rcfg"]
    torch.set_num_threads(max(1, int(rcfg.cpus_per_worker)))
    state = None
    with ray_train.restored_checkpoint() as folder:
        if folder is not None:
            state = load_state(folder)
    if state is not None:
        if state.get("done"):
            done = {"epoch": state["epoch"], "done": True}
            ray_train.report_restored(done) if rank == 0 else ray_train.report(done)
            return
        log.info("resuming %s at epoch %d", config["variant"], state["epoch"])

    def report_state(st: dict, metrics: dict | None = None) -> None:
        """Reports metrics; rank 0 also checkpoints the state (every rank holds the same DDP state)."""
        metrics = metrics or {"epoch": st["epoch"], **st["history"][-1]}
        if rank != 0:
            ray_train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(st, d)
            ray_train.report(metrics, d)

    data: Sequences = config["data"]
    model = build_model(rcfg, config["backbone"], config["item_repr"], data.num_items, config["llm"], data.train_popularity())
    result = fit(model, data, rcfg, srs=config["srs"], state=state, on_epoch=report_state,
                 rank=rank, world=worker.world, name=f"rat {config['variant']}")
    final = {"done": True, "epoch": len(result.history), "best_state": result.best_state, "best_epoch": result.best_epoch,
             "valid": result.valid, "test": result.test, "history": result.history, "text_weight": result.text_weight,
             "test_ranks": torch.from_numpy(result.test_ranks)}
    if result.without_text is not None:
        final["without_text"] = {**result.without_text, "test_ranks": torch.from_numpy(result.without_text["test_ranks"])}
    report_state(final, {"epoch": final["epoch"], "done": True})


def train_variant(cfg: Config, data: Sequences, backbone: str, item_repr: str, *,
                  llm: np.ndarray | None = None, srs: np.ndarray | None = None,
                  run: StageRun | None = None) -> tuple[SeqRecommender, dict]:
    """Trains (or resumes, or reuses) one model on Ray Train; returns it with best weights and its final state.
    With `run`, every epoch's metrics are tracked as they are reported, named `<variant>/<metric>`."""
    variant = f"{backbone}-{item_repr}"
    rcfg = cfg.rat
    log.info("training %s on %d workers", variant, rcfg.num_workers)
    result = ray_train.run_training(
        train_worker,
        {"rcfg": rcfg, "variant": variant, "backbone": backbone, "item_repr": item_repr, "data": data,
         "llm": llm, "srs": srs},
        name=variant, storage_uri=layout.rat_checkpoints_uri(cfg),
        num_workers=rcfg.num_workers, cpus_per_worker=rcfg.cpus_per_worker,
        on_report=run and run.steps("epoch", f"{variant}/"),
    )
    with ray_train.result_checkpoint(result, f"RAT training of {variant}") as folder:
        final = load_state(folder)
    model = build_model(rcfg, backbone, item_repr, data.num_items, llm)
    model.load_state_dict(final["best_state"])
    model.text_weight = final.get("text_weight", 0.0)  # checkpoints of earlier versions have no text channel
    model.eval()
    return model, final
