"""Stage 3: RAT. A collaborative ID-only SASRec (also the baseline), then the LLMEmb recommender
trained with alignment to it; the adapted item embeddings are published with the model and report.

Each model trains on Ray Train (DDP over `rat.num_workers`) with a checkpoint per
epoch under `<root>/rat/<run>/checkpoints/<variant>`; rerunning the same run resumes
there, and a variant that already finished is reused rather than retrained.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from llmemb_dist import report, storage
from llmemb_dist.config import Config, RatConfig, config_hash, to_dict
from llmemb_dist.data.catalog import ITEM_ID
from llmemb_dist.data.sequences import Sequences, bucketed_batches, build_sequences, pad_left, train_inputs
from llmemb_dist.evaluate import PROTOCOLS, EvalSplit, Scorer, make_split, ranks, summarize
from llmemb_dist.prepare import dataset_uri
from llmemb_dist.srs import SeqRecommender, build_model
from llmemb_dist.srs.losses import alignment_loss

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
PROGRESS_EVERY = 50  # steps between progress lines


# ---------------------------------------------------------------- inputs


def rat_uri(cfg: Config) -> str:
    """The publication of this RAT run: item embeddings, model, metrics and report."""
    return storage.join(cfg.root, "rat", cfg.rat.run, "result")


def embeddings_uri(cfg: Config) -> str:
    name = cfg.rat.embeddings
    return name if ("://" in name or "/" in name) else storage.join(cfg.root, "embeddings", name)


def load_llm_table(uri: str, item_ids: list[str], expected_dim: int = 0) -> np.ndarray:
    """The LLM embedding of every catalog item, row k - 1 for item k; a gap or a wrong dimension is an error."""
    table = storage.read_table(uri, "embeddings")
    if ITEM_ID not in table.column_names or "embedding" not in table.column_names:
        raise storage.DataError(f"{uri}: table 'embeddings' needs columns item_id and embedding, has {table.column_names}")
    emb_type = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(emb_type):
        raise storage.DataError(f"{uri}: field 'embedding' must be fixed_size_list<float32>[d], is {emb_type}")
    dim = emb_type.list_size
    if expected_dim and dim != expected_dim:
        raise storage.DataError(f"{uri}: field 'embedding' has dimension {dim}, config rat.embedding_dim says {expected_dim}")
    ids = table.column(ITEM_ID).to_pylist()
    if len(set(ids)) != len(ids):
        raise storage.DataError(f"{uri}: item_id is not unique in table 'embeddings'")
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.astype(np.float32).reshape(len(ids), dim)
    row = {item: i for i, item in enumerate(ids)}
    missing = [item for item in item_ids if item not in row]
    if missing:
        raise storage.DataError(
            f"{uri}: {len(missing)} of {len(item_ids)} catalog items have no embedding (first: {missing[:5]}); "
            "re-run the embedding stage for this catalog"
        )
    if len(ids) > len(item_ids):
        log.info("%s: %d embedded items are not in the catalog; ignored", uri, len(ids) - len(item_ids))
    return vectors[[row[item] for item in item_ids]]


def load_sequences(cfg: Config) -> Sequences:
    uri = dataset_uri(cfg)
    catalog = storage.read_table(uri, "catalog")
    return build_sequences(storage.read_table(uri, "interactions"), catalog.column(ITEM_ID).to_pylist(), f"{uri}/interactions")


# ---------------------------------------------------------------- training


class RatModule(nn.Module):
    """The training objective: recommendation loss, plus alpha * alignment of the batch's target items."""

    def __init__(self, model: SeqRecommender, srs: np.ndarray | None, alpha: float, temperature: float):
        super().__init__()
        self.model, self.alpha, self.temperature = model, alpha, temperature
        # Collaborative embeddings are a frozen input, not part of the saved model.
        self.register_buffer("srs", None if srs is None else torch.as_tensor(srs, dtype=torch.float32), persistent=False)

    def forward(self, seqs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        loss, targets, target_emb = self.model.rec_loss(seqs, generator)
        if self.srs is not None and self.alpha > 0:
            items, inverse = targets.unique(return_inverse=True)
            # Each distinct target's representation, taken from the recommendation loss's lookup, not recomputed.
            first = torch.full_like(items, len(targets)).scatter_reduce(
                0, inverse, torch.arange(len(targets), device=targets.device), "amin")
            loss = loss + self.alpha * alignment_loss(self.srs[items], target_emb[first], self.temperature)
        return loss


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    valid: dict
    test: dict
    history: list[dict] = field(default_factory=list)


def _gather_ranks(user_ranks: dict[str, np.ndarray], users: np.ndarray, total: int, world: int) -> dict[str, np.ndarray]:
    """Every worker ranked a share of the users; put all ranks back in user order."""
    parts = [(users, user_ranks)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (users, user_ranks))
    out = {p: np.zeros(total, dtype=np.int64) for p in user_ranks}
    for part_users, part_ranks in parts:
        for p in out:
            out[p][part_users] = part_ranks[p]
    return out


def evaluate_shared(model: SeqRecommender, split: EvalSplit, rcfg: RatConfig, rank: int, world: int,
                    protocols: tuple[str, ...] = PROTOCOLS) -> dict:
    model.eval()
    users = np.arange(len(split.targets))[rank::world]
    with torch.no_grad():
        table = model.items.table()  # once per evaluation, not per batch
        local = ranks(Scorer(model.user_repr, table), split, users, rcfg.max_len, protocols=protocols)
    return summarize(split, _gather_ranks(local, users, len(split.targets), world), rcfg.eval.ks)


def fit(
    model: SeqRecommender,
    data: Sequences,
    rcfg: RatConfig,
    *,
    srs: np.ndarray | None = None,
    state: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> FitResult:
    """Trains with early stopping on validation NDCG@10 and returns the best weights with their test metrics.

    `state` (from a checkpoint) resumes; `on_epoch` receives the state after every epoch.
    With world > 1 this runs inside a torch.distributed group and wraps the model in DDP.
    """
    torch.manual_seed(rcfg.seed)
    # As a model grows confident, values (sigmoids and softmaxes of large logits, their gradients, decaying
    # Adam moments) can reach the denormal range, where CPU arithmetic is far slower (a fused Adam step over
    # denormal moments: 48x); flushing them to zero changes no result. The likely cause of an amazon-toys
    # Bert4Rec run slowing from 11 to 23 s an epoch over 85 epochs.
    torch.set_flush_denormal(True)
    objective = RatModule(model, srs, rcfg.alpha, rcfg.align_temperature)
    # The only buffers are the frozen tables: nothing to broadcast each step.
    trainable = nn.parallel.DistributedDataParallel(objective, broadcast_buffers=False) if world > 1 else objective
    # The fused kernel: the same update as the default loop, which took a fifth of a CPU step (28 small tensors).
    optimizer = torch.optim.Adam(model.parameters(), lr=rcfg.lr, fused=True)
    valid_split, test_split = make_split(data, "valid", rcfg.eval), make_split(data, "test", rcfg.eval)
    seqs = [s for s in train_inputs(data, rcfg.max_len) if len(s) >= 2]  # one input and one target at least
    lengths = np.array([len(s) for s in seqs])
    if state is None:
        state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [],
                 "best_state": copy.deepcopy(model.state_dict())}
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    while state["epoch"] < rcfg.epochs and state["bad_epochs"] < rcfg.patience:
        epoch = state["epoch"]
        started = time.perf_counter()
        # The data order comes from (seed, epoch), so a resumed run continues exactly where it stopped.
        batches = bucketed_batches(lengths, rcfg.batch_size, np.random.default_rng([rcfg.seed, epoch]))
        steps = math.ceil(len(batches) / world)  # equal steps on every worker, or DDP hangs
        mine = [batches[(rank + world * i) % len(batches)] for i in range(steps)]
        generator = torch.Generator().manual_seed(rcfg.seed * 1_000_003 + epoch * 101 + rank)
        objective.train()
        total = 0.0
        for step, batch in enumerate(mine, 1):
            loss = trainable(torch.as_tensor(pad_left([seqs[i] for i in batch], rcfg.max_len + 1)), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            if rank == 0 and step % PROGRESS_EVERY == 0:
                spent = time.perf_counter() - started
                log.info("epoch %d step %d/%d loss %.4f, ETA %.0f s", epoch + 1, step, steps, total / step,
                         spent / step * (steps - step))
        train_s = time.perf_counter() - started
        # Early stopping watches one protocol: ranking the whole catalog for the other would be wasted each epoch.
        valid = evaluate_shared(model, valid_split, rcfg, rank, world, (rcfg.eval.select_protocol,))
        score = valid[rcfg.eval.select_protocol]["overall"]["NDCG@10"]
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_state=copy.deepcopy(model.state_dict()))
        else:
            state["bad_epochs"] += 1
        state["history"].append({
            "epoch": epoch + 1, "loss": total / max(1, len(mine)), "train_seconds": train_s,
            "valid_ndcg10": score, "valid_hr10": valid[rcfg.eval.select_protocol]["overall"]["HR@10"],
        })
        state.update(epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(), valid=valid)
        log.info("epoch %d/%d: loss %.4f, valid NDCG@10 %.4f (best %.4f at %d), %.1f s training",
                 epoch + 1, rcfg.epochs, state["history"][-1]["loss"], score, state["best_score"],
                 state["best_epoch"], train_s)
        if on_epoch:
            on_epoch(state)
    model.load_state_dict(state["best_state"])
    best_valid = evaluate_shared(model, valid_split, rcfg, rank, world)
    test = evaluate_shared(model, test_split, rcfg, rank, world)
    return FitResult(state["best_state"], state["best_epoch"], best_valid, test, state["history"])


def _train_worker(config: dict) -> None:
    """Ray Train worker: resume from the latest checkpoint, fit, report the final state with done=True."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rcfg: RatConfig = config["rcfg"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rat %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(rcfg.cpus_per_worker)))
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        if state.get("done"):
            ray.train.report({"epoch": state["epoch"], "done": True}, checkpoint=checkpoint if rank == 0 else None)
            return
        log.info("resuming %s at epoch %d", config["variant"], state["epoch"])

    def report_state(st: dict, metrics: dict | None = None) -> None:
        """Reports metrics; rank 0 also checkpoints the state (every rank holds the same DDP state)."""
        metrics = metrics or {"epoch": st["epoch"], **st["history"][-1]}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(st, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    model = build_model(rcfg, config["backbone"], config["item_repr"], config["data"].num_items, config["llm"])
    result = fit(model, config["data"], rcfg, srs=config["srs"], state=state, on_epoch=report_state, rank=rank, world=world)
    final = {"done": True, "epoch": len(result.history), "best_state": result.best_state, "best_epoch": result.best_epoch,
             "valid": result.valid, "test": result.test, "history": result.history}
    report_state(final, {"epoch": final["epoch"], "done": True})


def train_variant(cfg: Config, data: Sequences, backbone: str, item_repr: str, *,
                  llm: np.ndarray | None = None, srs: np.ndarray | None = None) -> tuple[SeqRecommender, dict]:
    """Trains (or resumes, or reuses) one model on Ray Train; returns it with best weights and its final state."""
    from llmemb_dist.distributed.ray_train import run_training

    variant = f"{backbone}-{item_repr}"
    rcfg = cfg.rat
    log.info("training %s on %d workers", variant, rcfg.num_workers)
    result = run_training(
        _train_worker,
        {"rcfg": rcfg, "variant": variant, "backbone": backbone, "item_repr": item_repr, "data": data,
         "llm": llm, "srs": srs},
        name=variant, storage_uri=storage.join(cfg.root, "rat", rcfg.run, "checkpoints"),
        num_workers=rcfg.num_workers, cpus_per_worker=rcfg.cpus_per_worker,
    )
    if result.checkpoint is None:
        raise RuntimeError(f"RAT training of {variant} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        final = torch.load(Path(d) / STATE_FILE, weights_only=False)
    model = build_model(rcfg, backbone, item_repr, data.num_items, llm)
    model.load_state_dict(final["best_state"])
    model.eval()
    return model, final


# ---------------------------------------------------------------- the stage


def item_table(model: SeqRecommender, item_ids: list[str]) -> pa.Table:
    with torch.no_grad():
        emb = model.items.table()[1:].float().numpy()
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    return pa.table({ITEM_ID: pa.array(item_ids, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})


def _summary(final: dict) -> dict:
    return {"best_epoch": final["best_epoch"], "epochs": final["epoch"], "valid": final["valid"], "test": final["test"],
            "history": final["history"]}


def rat(cfg: Config) -> str:
    """Runs RAT end to end and publishes `rat_uri(cfg)`; returns that URI."""
    from safetensors.torch import save_file

    from llmemb_dist.cluster import init_ray

    out_uri = rat_uri(cfg)
    rcfg = cfg.rat
    uses_llm = rcfg.item_repr != "id"
    emb_uri = embeddings_uri(cfg) if uses_llm else ""
    # The exact upstream versions: a re-published dataset or embeddings version means new inputs.
    inputs = {"dataset": dataset_uri(cfg), "dataset_data": storage.read_manifest(dataset_uri(cfg))["data_dir"],
              "embeddings": emb_uri, "embeddings_data": storage.read_manifest(emb_uri)["data_dir"] if emb_uri else ""}
    if storage.is_published(out_uri):
        manifest = storage.read_manifest(out_uri)
        if manifest["config_hash"] == config_hash(rcfg) and manifest["inputs"] == inputs:
            log.info("%s is already published from this config and these inputs: nothing to do", out_uri)
            return out_uri
        raise storage.AlreadyPublished(f"{out_uri} is published from another config or inputs; choose another rat.run")
    data = load_sequences(cfg)
    log.info("%d users (%d dropped with < 3 events), %d items", len(data.seqs), data.dropped_users, data.num_items)
    llm = None
    if uses_llm:
        llm = load_llm_table(emb_uri, data.item_ids, rcfg.embedding_dim)
    init_ray(cfg.ray)
    # The collaborative SASRec is the ID-only baseline too: trained once, used twice.
    baseline, baseline_final = train_variant(cfg, data, rcfg.backbone, "id")
    variants = {f"{rcfg.backbone}-id": _summary(baseline_final)}
    model, main = baseline, f"{rcfg.backbone}-id"
    if uses_llm:
        collab = baseline if rcfg.backbone == "sasrec" else train_variant(cfg, data, "sasrec", "id")[0]
        srs = collab.items.table().detach().numpy()
        model, final = train_variant(cfg, data, rcfg.backbone, rcfg.item_repr, llm=llm, srs=srs)
        main = f"{rcfg.backbone}-{rcfg.item_repr}"
        variants[main] = _summary(final)
    metrics = {"main": main, "baseline": f"{rcfg.backbone}-id", "dropped_users": data.dropped_users,
               "users": len(data.seqs), "items": data.num_items, "variants": variants}
    model_config = {"backbone": rcfg.backbone, "item_repr": rcfg.item_repr, "num_items": data.num_items,
                    "hidden": rcfg.hidden, "layers": rcfg.layers, "heads": rcfg.heads, "max_len": rcfg.max_len,
                    "adapter_hidden": rcfg.adapter_hidden, "llm_dim": None if llm is None else int(llm.shape[1]),
                    "embeddings": emb_uri, "row_k_is": "item k of table item_embeddings (row 0 is padding)"}
    with storage.publish(out_uri, kind="rat", config=to_dict(cfg), config_hash=config_hash(rcfg), inputs=inputs) as pub:
        pub.write_table("item_embeddings", item_table(model, data.item_ids), num_shards=1)
        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(d) / "model.safetensors"))
            (Path(d) / "model_config.json").write_text(json.dumps(model_config, indent=2))
            pub.upload_dir(d, "model")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
            report.write_report(metrics, Path(d))
            pub.upload_dir(d, "report")
        pub.info["metrics"] = comparison_rows(metrics)
        pub.info["embeddings_input"] = emb_uri
    log.info("published %s\n%s", out_uri, report.comparison_markdown(comparison_rows(metrics)))
    return out_uri


def comparison_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """ID-only vs LLMEmb test results: overall/head/tail NDCG@10 and HR@10 per protocol."""
    rows = []
    for variant, summary in metrics["variants"].items():
        for protocol, groups in summary["test"].items():
            row: dict[str, Any] = {"model": variant, "protocol": protocol}
            for group in ("overall", "head", "tail"):
                row[f"{group} NDCG@10"] = groups[group]["NDCG@10"]
                row[f"{group} HR@10"] = groups[group]["HR@10"]
            rows.append(row)
    return rows
