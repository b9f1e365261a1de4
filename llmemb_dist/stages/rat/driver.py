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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from llmemb_dist import layout, storage, tracking
from llmemb_dist.config import Config, RatConfig, config_hash, to_dict
from llmemb_dist.distributed.cluster import init_ray
from llmemb_dist.data.embeddings import embeddings_table, load_llm_table
from llmemb_dist.data.sequences import Sequences
from llmemb_dist.srs import SeqRecommender
from llmemb_dist.srs.placement import NEW_ITEM_SCALE, ItemPlacement
from llmemb_dist.stages.rat import report, significance
from llmemb_dist.stages.rat.calibrate import calibrated_placement
from llmemb_dist.stages.rat.cold import cold_start_report
from llmemb_dist.stages.rat.evaluate import EvalSplit, check_negatives, make_split, sample_users
from llmemb_dist.stages.rat.inputs import catalog_text_hashes, load_cold_split, load_sequences
from llmemb_dist.stages.rat.objective import check_objective_fits
from llmemb_dist.stages.rat.references import reference_results
from llmemb_dist.stages.rat.trainer import FitResult
from llmemb_dist.stages.rat.worker import train_variant

log = logging.getLogger(__name__)
PLACEMENT_DIR = "placement"


def item_placement(model: SeqRecommender, rcfg: RatConfig, data: Sequences, text_hashes: list[str],
                   llm: np.ndarray | None, emb_uri: str) -> ItemPlacement:
    """The trained item representation with what adapt needs to place any item the way RAT does."""
    spec = {"item_repr": rcfg.item_repr, "hidden": rcfg.hidden, "adapter_hidden": rcfg.adapter_hidden,
            "llm_dim": 0 if llm is None else int(llm.shape[1])}
    if llm is not None:
        manifest = storage.read_manifest(emb_uri)
        spec["embeddings"] = {"uri": emb_uri, "data_dir": manifest["data_dir"], "encoder": manifest.get("encoder"),
                              "base_model": manifest.get("base_model")}
    placement = calibrated_placement(model, spec, data, text_hashes, llm, rcfg)
    if llm is not None:
        log.info("a new item's text side is scaled by %.3f (calibrated on validation users)", placement.spec[NEW_ITEM_SCALE])
    return placement


def item_table(placement: ItemPlacement, item_ids: list[str], text_hashes: list[str], llm: np.ndarray | None) -> pa.Table:
    """RAT's item table, through the same placement the adapt stage applies to new items."""
    raw = np.zeros((len(item_ids), 0), dtype=np.float32) if llm is None else llm
    vectors = placement.vectors(item_ids, text_hashes, raw)
    return embeddings_table(pa.array(item_ids, pa.string()), pa.array(text_hashes, pa.string()), vectors)


def _summary(result: FitResult, scored: dict | None = None) -> dict:
    """A trained model's report entry; `scored` ({"valid", "test", "text_weight"}) holds the figures of another
    way to score the same weights."""
    scored = scored or {"valid": result.valid, "test": result.test, "text_weight": result.text_weight}
    return {"best_epoch": result.best_epoch, "epochs": result.epochs, "valid": scored["valid"], "test": scored["test"],
            "history": result.history, "text_weight": scored["text_weight"]}


def model_entries(name: str, result: FitResult, plain_name: bool) -> dict[str, tuple[dict, np.ndarray]]:
    """{variant: (report entry, test ranks)} of one trained model. With a text channel, `plain_name` keeps
    `name` for the model scored without it and names the text-channel one `<name>+text` (the ID-only
    baseline); otherwise `name` is the model as it scores (the LLMEmb recommender)."""
    plain = result.without_text
    if plain is None or not plain_name:
        return {name: (_summary(result), result.test_ranks)}
    return {name: (_summary(result, {**plain, "text_weight": 0.0}), plain["test_ranks"]),
            f"{name}+text": (_summary(result), result.test_ranks)}


def rat(cfg: Config) -> str:
    """Runs RAT end to end and publishes `layout.rat_result_uri(cfg)`; returns that URI."""
    out_uri = layout.rat_result_uri(cfg)
    rcfg = cfg.rat
    uses_llm = rcfg.item_repr != "id"
    emb_uri = layout.rat_input_embeddings_uri(cfg) if uses_llm else ""
    data_uri = layout.dataset_uri(cfg)
    # The exact upstream versions: a re-published dataset or embeddings version means new inputs.
    inputs = {"dataset": data_uri, "dataset_data": storage.read_manifest(data_uri)["data_dir"],
              "embeddings": emb_uri, "embeddings_data": storage.read_manifest(emb_uri)["data_dir"] if emb_uri else ""}
    if storage.already_published(out_uri, {"config_hash": config_hash(rcfg), "inputs": inputs}, "RAT result",
                                 hint="choose another rat.run"):
        return out_uri
    with tracking.stage_run(cfg, "rat", rcfg.run) as run:
        _train_and_publish(cfg, inputs, run)
    return out_uri


def _train_and_publish(cfg: Config, inputs: dict[str, str], run: tracking.StageRun) -> None:
    """Trains the baseline and the LLMEmb recommender, then publishes them with the report."""
    from safetensors.torch import save_file

    out_uri, rcfg, emb_uri = layout.rat_result_uri(cfg), cfg.rat, inputs["embeddings"]
    uses_llm = rcfg.item_repr != "id"
    started = time.perf_counter()
    data = load_sequences(cfg)
    # With a cold-start split RAT trains on the warm items only, and the cold ones are scored as new items.
    split = load_cold_split(cfg, data) if rcfg.cold.enabled else None
    if split is not None:
        data = split.warm
    log.info("%d users (%d dropped with < 3 events), %d items, %d events", data.num_users, data.dropped_users,
             data.num_items, len(data.events.values))
    check_negatives(data, rcfg.eval)  # before Ray starts
    check_objective_fits(rcfg, data.num_items)
    llm = llm_all = None
    if uses_llm:
        llm_all = load_llm_table(emb_uri, split.item_ids if split else data.item_ids, rcfg.embedding_dim)
        llm = llm_all[: data.num_items]
    # Where the time goes: optimizer steps, validation checks, final evaluations (the references' too).
    seconds = {"load": time.perf_counter() - started, "train": 0.0, "validate": 0.0, "final": 0.0, "ray_train": 0.0}

    def train(*args, **kwargs) -> tuple[SeqRecommender, FitResult]:
        """train_variant, its time added to `seconds`: Ray Train's own (start, reports, checkpoints) apart."""
        began = time.perf_counter()
        trained, result = train_variant(cfg, data, *args, **kwargs, run=run)
        for phase in ("train", "validate", "final"):
            seconds[phase] += result.seconds.get(phase, 0.0)
        seconds["ray_train"] += time.perf_counter() - began - sum(result.seconds.values())
        return trained, result

    init_ray(cfg.ray, cfg.log.verbose)
    began = time.perf_counter()
    # The references' splits: the same as each trained model's, whose training says what they hold.
    valid_split = sample_users(make_split(data, "valid", rcfg.eval, warn=False), rcfg.eval.valid_users, rcfg.eval.seed)
    test_split = make_split(data, "test", rcfg.eval, warn=False)
    entries = {name: (result, result["test_ranks"])
               for name, result in reference_results(data, llm, rcfg, valid_split, test_split).items()}
    seconds["final"] += time.perf_counter() - began
    # The collaborative SASRec is the ID-only baseline too: trained once, used twice. Given the LLM table it
    # has the text channel as well, weighed on validation like the LLMEmb model's: the baseline "+text".
    baseline, baseline_result = train(rcfg.backbone, "id", llm=llm)
    baseline_name = f"{rcfg.backbone}-id"
    entries.update(model_entries(baseline_name, baseline_result, plain_name=True))
    model, main = baseline, baseline_name
    if uses_llm:
        collab = baseline if rcfg.backbone == "sasrec" else train("sasrec", "id")[0]
        srs = collab.items.table().detach().numpy()
        model, result = train(rcfg.backbone, rcfg.item_repr, llm=llm, srs=srs)
        main = f"{rcfg.backbone}-{rcfg.item_repr}"
        entries.update(model_entries(main, result, plain_name=False))
    variants = {name: {k: v for k, v in entry.items() if k != "test_ranks"} for name, (entry, _) in entries.items()}
    metrics = {"main": main, "baseline": baseline_name, "dropped_users": data.dropped_users,
               "users": data.num_users, "items": data.num_items, "events": len(data.events.values),
               "variants": variants, "seconds": seconds}
    if main != baseline_name:
        metrics["comparison"] = against_strongest(main, entries, test_split, rcfg.eval.select_protocol)
    hashes = catalog_text_hashes(cfg, data.item_ids)
    placement = item_placement(model, rcfg, data, hashes, llm, emb_uri)
    if split is not None:
        id_only = copy.copy(baseline)  # the same weights, scored without the text channel
        id_only.text_weight = 0.0
        models = {baseline_name: (id_only, None), main: (model, placement)}
        if baseline.text_weight:
            models[f"{baseline_name}+text"] = (baseline, None)
        metrics["cold_start"] = cold_start_report(rcfg, split, models, llm_all)
    run.log_final(metrics)
    model_config = {"backbone": rcfg.backbone, "item_repr": rcfg.item_repr, "num_items": data.num_items,
                    "hidden": rcfg.hidden, "layers": rcfg.layers, "heads": rcfg.heads, "max_len": rcfg.max_len,
                    "adapter_hidden": rcfg.adapter_hidden, "llm_dim": None if llm is None else int(llm.shape[1]),
                    "text_weight": model.text_weight,
                    "embeddings": emb_uri, "row_k_is": "item k of table item_embeddings (row 0 is padding)"}
    began = time.perf_counter()
    with storage.publish(out_uri, kind="rat", config=to_dict(cfg), config_hash=config_hash(rcfg), inputs=inputs) as pub:
        pub.write_table("item_embeddings", item_table(placement, data.item_ids, hashes, llm), num_shards=1)
        with tempfile.TemporaryDirectory() as d:
            placement.save(d)
            pub.upload_dir(d, PLACEMENT_DIR)
        pub.info["placement"] = {"folder": PLACEMENT_DIR, **placement.spec}
        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(d) / "model.safetensors"))
            (Path(d) / "model_config.json").write_text(json.dumps(model_config, indent=2))
            pub.upload_dir(d, "model")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
            report.write_report(metrics, Path(d))
            pub.upload_dir(d, "report")
            run.log_artifacts(d, "report")
        pub.info["metrics"] = comparison_rows(metrics)
        pub.info["comparison"] = metrics.get("comparison")
        pub.info["embeddings_input"] = emb_uri
        run.publish(pub)
    log.info("published %s; %s; time: %s, publish %.1f s", out_uri, report.strongest_line(metrics.get("comparison")),
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), time.perf_counter() - began)
    if split is not None:
        log.info("cold start, test, full ranking:\n%s", report.cold_start_markdown(metrics["cold_start"]))


def against_strongest(main: str, entries: dict[str, tuple[dict, np.ndarray]], test: EvalSplit, protocol: str) -> dict:
    """The main model against the baseline with the best validation NDCG@10 under `protocol`: test ratios
    and paired p-values per group, under full ranking."""
    baselines = {name: entry["valid"] for name, (entry, _) in entries.items() if name != main}
    strongest = significance.strongest(baselines, protocol)
    return {"model": main, "baseline": strongest, "selected_by": f"validation NDCG@10, {protocol} ranking",
            "groups": significance.compare(entries[main][1], entries[strongest][1], test.head)}


def comparison_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model's and reference's test results: overall/head/tail NDCG@10 and HR@10 per protocol, with the
    best epoch of trained ones."""
    rows = []
    for variant, summary in metrics["variants"].items():
        for protocol, groups in summary["test"].items():
            row: dict[str, Any] = {"model": variant, "protocol": protocol,
                                   "best epoch": f"{summary['best_epoch']} of {summary['epochs']}" if "best_epoch" in summary else "-"}
            for group in ("overall", "head", "tail"):
                row[f"{group} NDCG@10"] = groups[group]["NDCG@10"]
                row[f"{group} HR@10"] = groups[group]["HR@10"]
            rows.append(row)
    return rows
