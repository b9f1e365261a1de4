"""The RAT training loop: bucketed batches, early stopping on validation NDCG@10, resumable state.

Plain PyTorch: with several workers it is handed their rank and world size, and the
collectives come from distributed/collective.py.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from llmemb_dist.config import RatConfig
from llmemb_dist.data.sequences import Sequences, bucketed_batches, pad_left, train_inputs
from llmemb_dist.distributed.collective import data_parallel, gather_objects, mean_over_workers
from llmemb_dist.progress import Progress
from llmemb_dist.srs import SeqRecommender
from llmemb_dist.srs.losses import Objective
from llmemb_dist.stages.rat.evaluate import PROTOCOLS, EvalSplit, Scorer, make_split, ranks, sample_users, summarize
from llmemb_dist.stages.rat.objective import RatModule
from llmemb_dist.storage import DataError

log = logging.getLogger(__name__)


class TrainingDiverged(DataError):
    """The training loss stopped being a number: the run cannot be selected or published."""


@dataclass
class TrainState:
    """Where a RAT run is, all it needs to resume: the epoch, early stopping's counters, the best weights so
    far, and the model's and optimizer's state after the last epoch."""

    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)


@dataclass
class FitResult:
    """A finished run: the best weights, their figures, and how the run went."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    valid: dict
    test: dict
    history: list[dict] = field(default_factory=list)
    text_weight: float = 0.0
    # Each test user's full-ranking rank (0-based), for paired tests between models of one split.
    test_ranks: np.ndarray | None = None
    # With a text channel: the same best weights scored without it ({"valid", "test", "test_ranks"}).
    without_text: dict | None = None
    # Wall time of this run's optimizer steps, its validation checks and its final evaluation.
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)


def _gather_ranks(user_ranks: dict[str, np.ndarray], users: np.ndarray, total: int, world: int) -> dict[str, np.ndarray]:
    """Every worker ranked a share of the users; put all ranks back in user order."""
    out = {p: np.zeros(total, dtype=np.int64) for p in user_ranks}
    for part_users, part_ranks in gather_objects((users, user_ranks), world):
        for p in out:
            out[p][part_users] = part_ranks[p]
    return out


def shared_ranks(model: SeqRecommender, split: EvalSplit, rcfg: RatConfig, rank: int, world: int,
                 protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, np.ndarray]:
    """Every user's rank per protocol; each worker ranks a share of the users."""
    model.eval()
    users = np.arange(len(split.targets))[rank::world]
    with torch.no_grad():
        table = model.item_vectors()  # once per evaluation, not per batch
        local = ranks(Scorer(model.user_vectors, table), split, users, rcfg.max_len, protocols=protocols)
    return _gather_ranks(local, users, len(split.targets), world)


def evaluate_shared(model: SeqRecommender, split: EvalSplit, rcfg: RatConfig, rank: int, world: int,
                    protocols: tuple[str, ...] = PROTOCOLS) -> dict:
    return summarize(split, shared_ranks(model, split, rcfg, rank, world, protocols), rcfg.eval.ks)


def final_evaluation(model: SeqRecommender, valid: EvalSplit, test: EvalSplit, rcfg: RatConfig, rank: int,
                     world: int) -> dict:
    """{"valid", "test"} summaries under every protocol, and the test users' full-ranking ranks."""
    test_ranks = shared_ranks(model, test, rcfg, rank, world)
    return {"valid": evaluate_shared(model, valid, rcfg, rank, world), "test": summarize(test, test_ranks, rcfg.eval.ks),
            "test_ranks": test_ranks["full"]}


def check_epochs(rcfg: RatConfig, steps_per_epoch: int) -> int:
    """Epochs between validation checks: those that make up `rat.eval_every_steps` optimizer steps (1 when 0),
    so that patience, counted in checks, means the same amount of training on a small dataset as on a large one."""
    if not rcfg.eval_every_steps:
        return 1
    return max(1, round(rcfg.eval_every_steps / max(1, steps_per_epoch)))


def choose_text_weight(model: SeqRecommender, split: EvalSplit, rcfg: RatConfig, rank: int, world: int) -> float:
    """The text channel's weight among `rat.text_weights` with the best validation NDCG@10 under the selection
    protocol (the smallest on a tie), set on the model. Chosen after training, on the same users early
    stopping watched, so it is model selection like the epoch; without a text channel it stays 0."""
    if model.text is None:
        return model.text_weight
    protocol = rcfg.eval.select_protocol
    scores = {}
    for weight in sorted(set(rcfg.text_weights)):
        model.text_weight = weight
        scores[weight] = evaluate_shared(model, split, rcfg, rank, world, (protocol,))[protocol]["overall"]["NDCG@10"]
    model.text_weight = max(scores, key=lambda w: (scores[w], -w))
    if rank == 0:
        log.info("text channel: weight %g (validation NDCG@10 %s)", model.text_weight,
                 ", ".join(f"{w:g}: {v:.4f}" for w, v in scores.items()))
    return model.text_weight


def fit(
    model: SeqRecommender,
    data: Sequences,
    rcfg: RatConfig,
    *,
    srs: np.ndarray | None = None,
    state: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    rank: int = 0,
    world: int = 1,
    name: str = "rat",
) -> FitResult:
    """Trains with early stopping on validation NDCG@10 and returns the best weights with their test metrics.

    `state` (from a checkpoint) resumes; `on_epoch` receives the state after every epoch and `on_step` the
    number of each optimizer step done (counted over the run); `name` begins the progress lines.
    With world > 1 this runs inside a torch.distributed group and wraps the model in DDP.
    """
    torch.manual_seed(rcfg.seed)
    model.text_weight = 0.0  # the text channel's weight is chosen after training
    # As a model grows confident, values (sigmoids and softmaxes of large logits, their gradients, decaying
    # Adam moments) can reach the denormal range, where CPU arithmetic is far slower; flushing them to zero
    # changes no result (RAT epoch times: bench/rat_bench.py).
    torch.set_flush_denormal(True)
    rec = Objective(rcfg.loss, data.num_items, rcfg.num_negatives, data.train_popularity())
    objective = RatModule(model, rec, srs, rcfg.alpha, rcfg.align_temperature)
    trainable = data_parallel(objective, world)
    # The fused kernel: the same update as the default per-tensor loop, which costs a large share of a CPU
    # step over this many small tensors (bench/rat_bench.py keeps the epoch times).
    optimizer = torch.optim.Adam(model.parameters(), lr=rcfg.lr, fused=True)
    valid_split = sample_users(make_split(data, "valid", rcfg.eval, warn=rank == 0), rcfg.eval.valid_users,
                               rcfg.eval.seed)
    test_split = make_split(data, "test", rcfg.eval, warn=False)
    seqs = train_inputs(data, rcfg.max_len)
    seqs = seqs.take(np.flatnonzero(seqs.lengths >= 2))  # one input and one target at least
    lengths = seqs.lengths
    steps_per_epoch = math.ceil(len(bucketed_batches(lengths, rcfg.batch_size, np.random.default_rng([rcfg.seed, 0]))) / world)
    every = check_epochs(rcfg, steps_per_epoch)
    if state is None:
        state = TrainState(best_state=copy.deepcopy(model.state_dict()))
    else:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    # Its pace includes each epoch's validation; early stopping may end the run before the last epoch.
    progress = Progress(log, f"{name} epoch", rcfg.epochs, start=state.epoch, at_most=True)
    while state.epoch < rcfg.epochs and state.bad_epochs < rcfg.patience:
        epoch = state.epoch
        started = time.perf_counter()
        # The data order comes from (seed, epoch), so a resumed run continues exactly where it stopped.
        batches = bucketed_batches(lengths, rcfg.batch_size, np.random.default_rng([rcfg.seed, epoch]))
        steps = math.ceil(len(batches) / world)  # equal steps on every worker, or DDP hangs
        mine = [batches[(rank + world * i) % len(batches)] for i in range(steps)]
        epoch_seed = rcfg.seed * 1_000_003 + epoch * 101 + rank
        generator = torch.Generator().manual_seed(epoch_seed)
        # Dropout draws from the global generator: seeded per epoch too, so that a run resumed at any epoch
        # continues exactly as the run it resumes would have.
        torch.manual_seed(epoch_seed)
        objective.train()
        total = 0.0
        step_progress = Progress(log, f"{name} epoch {epoch + 1} step", len(mine), quiet_start=True)
        for step, batch in enumerate(mine, 1):
            loss = trainable(torch.as_tensor(pad_left(seqs.take(batch), rcfg.max_len + 1)), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            if rank == 0:
                step_progress.update(step, f"loss {total / step:.4f}")
            if on_step:
                on_step(epoch * steps + step)
        train_s = time.perf_counter() - started
        # One collective per epoch: every worker stops at the same epoch, whichever one diverged.
        epoch_loss = mean_over_workers(torch.tensor(total / max(1, len(mine)), dtype=torch.float64), world)
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"{name}: the training loss is {epoch_loss} in epoch {epoch + 1}: the model "
                                   "diverged (a lower rat.lr, or the embeddings' values, may be the cause); "
                                   "nothing is published")
        entry = {"epoch": epoch + 1, "loss": epoch_loss, "train_seconds": train_s}
        checked = (epoch + 1) % every == 0 or epoch + 1 == rcfg.epochs
        if checked:
            check_started = time.perf_counter()
            # Early stopping watches one protocol: ranking the whole catalog for the other would be wasted.
            valid = evaluate_shared(model, valid_split, rcfg, rank, world, (rcfg.eval.select_protocol,))
            score = valid[rcfg.eval.select_protocol]["overall"]["NDCG@10"]
            if score > state.best_score:
                state.best_score, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
                state.best_state = copy.deepcopy(model.state_dict())
            else:
                state.bad_epochs += 1
            entry.update(valid_ndcg10=score, valid_hr10=valid[rcfg.eval.select_protocol]["overall"]["HR@10"],
                         valid_seconds=time.perf_counter() - check_started)
        state.history.append(entry)
        state.epoch, state.model, state.optimizer = epoch + 1, model.state_dict(), optimizer.state_dict()
        if rank == 0:
            checked_note = (f", valid NDCG@10 {entry['valid_ndcg10']:.4f}" if checked else "")
            progress.update(epoch + 1, f"loss {epoch_loss:.4f}{checked_note} "
                            f"(best {state.best_score:.4f} at {state.best_epoch})",
                            last=state.bad_epochs >= rcfg.patience)
        if on_epoch:
            on_epoch(state)
    model.load_state_dict(state.best_state)
    final_started = time.perf_counter()
    text_weight = choose_text_weight(model, valid_split, rcfg, rank, world)
    chosen = final_evaluation(model, valid_split, test_split, rcfg, rank, world)
    without_text = None
    if model.text is not None:
        model.text_weight = 0.0
        without_text = final_evaluation(model, valid_split, test_split, rcfg, rank, world)
        model.text_weight = text_weight
    seconds = {"train": sum(e["train_seconds"] for e in state.history),
               "validate": sum(e.get("valid_seconds", 0.0) for e in state.history),
               "final": time.perf_counter() - final_started}
    return FitResult(state.best_state, state.best_epoch, chosen["valid"], chosen["test"], state.history,
                     text_weight, chosen["test_ranks"], without_text, seconds)
