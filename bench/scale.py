"""The system's own costs against catalog size: prepare, embed, incremental embed, RAT and adapt.

    python bench/scale.py [--sizes 100000 1000000] [--stages prepare embed ...] [--redo]

Per size, a seeded synthetic catalog (title, brand, categories and a description drawn from fixed
vocabularies) with as many users as items and 5-15 events each, items drawn with Zipf-like popularity, so
that most of the catalog's tail has no interactions (RAT's active set is smaller than the catalog, as in a
real one). The base model is a tiny random BERT with MiniLM's tokenizer: what is measured is the system
(Ray Data, Parquet, planning, verification, publishing), not the model.

Stages, each its own `launch/<stage>.py` process on the embedded Ray (2 CPUs), alone on the machine:
- `prepare`: the import of the RecBole files;
- `embed`: every item, no adapter; `bare`: the same prompts, model and batch in one plain process (the
  loop the job is judged against: embed items/s over bare items/s);
- `incremental`: 5 % of the items, scattered over the catalog, with an edited title, embedded incrementally
  from `embed`'s version (nearly every file of it holds an edited item, so their other rows are rewritten);
- `appended`: 5 % new items added to the catalog, embedded incrementally from `embed`'s version (its files
  are copied on the store as they are, blockio.CarryOver);
- `rat`: one epoch of SASRec on the active items (the ID baseline and llm_gate), sampled softmax, one Ray
  Train worker with both CPUs; `rat2`: the same on two workers of one CPU each (data parallel). Early
  stopping's check ranks a seeded sample of validation users; the final test ranks every user. The
  stage's log splits its time into load, train (the optimizer steps), validate (early stopping's checks),
  final (the final evaluations and the references), Ray Train's own and publish;
- `adapt`: every item of the catalog into RAT's space.
For each: the process's wall time (Python and Ray start included), items/s over it, and the peak memory of
the driver and of the busiest Ray worker (bench/procstat.py). A (stage, size) already measured is kept, so
an interrupted run resumes, on another machine too: each row says where and at which commit it ran.
Writes bench/results/scale.md, .json and .png; inputs and outputs live under bench/.cache/scale/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from procstat import MACHINE, commit, run_measured

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache" / "scale"
RESULTS = BENCH / "results"
DEFAULT = BENCH.parent / "configs" / "default.yaml"  # the embedded default, with the settings below over it
STAGES = ["prepare", "bare", "embed", "incremental", "appended", "rat", "rat2", "adapt"]
VALID_USERS = 2000  # early stopping's sample of validation users
CHANGED = ADDED = 0.05
BATCH = 256
EVENTS_PER_USER = (5, 15)
WORDS = [f"w{k:04d}" for k in range(3000)]
BRANDS = [f"brand{k:03d}" for k in range(500)]
CATEGORIES = [f"category{k:02d}" for k in range(100)]


def write_catalog(folder: Path, size: int, changed: float = 0.0, added: float = 0.0) -> None:
    """RecBole atomic files of a synthetic catalog; with `changed`, that share of the items gets an edited
    title, with `added`, that share of new items follows the others (the same items and interactions otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), (size, 20))]
    titles = [" ".join(row[:n]) for row, n in zip(words, rng.integers(3, 7, size))]
    descriptions = [" ".join(row[n:]) for row, n in zip(words, rng.integers(6, 10, size))]
    cats = np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), (size, 3))]
    categories = [" ".join(row[:n]) for row, n in zip(cats, rng.integers(1, 4, size))]
    if changed:
        edited = np.random.default_rng(size + 1).choice(size, int(changed * size), replace=False)
        for k in edited:
            titles[k] += " (edited)"
    items = pd.DataFrame({"item_id:token": [f"i{k}" for k in range(size)], "title:token_seq": titles,
                          "brand:token": np.array(BRANDS)[rng.integers(0, len(BRANDS), size)],
                          "categories:token_seq": categories, "description:token_seq": descriptions})
    if added:
        new = items.sample(int(added * size), random_state=size + 2).reset_index(drop=True)
        new["item_id:token"] = [f"i{k}" for k in range(size, size + len(new))]
        new["title:token_seq"] = "new " + new["title:token_seq"]
        items = pd.concat([items, new], ignore_index=True)
    items.to_csv(folder / "synth.item", sep="\t", index=False)
    same = folder.parent / "synth" / "synth.inter"  # every catalog of a size has the same interactions
    if folder.name != "synth" and same.is_file():
        os.link(same, folder / "synth.inter")
        return

    events = rng.integers(EVENTS_PER_USER[0], EVENTS_PER_USER[1] + 1, size)
    users = np.repeat(np.arange(size), events)
    popularity = 1.0 / np.arange(1, size + 1) ** 0.9  # Zipf-like over a seeded order of the items
    item = rng.permutation(size)[rng.choice(size, len(users), p=popularity / popularity.sum())]
    order = np.arange(len(users)) - np.repeat(np.cumsum(events) - events, events)  # event index within the user
    inter = pd.DataFrame({"user_id:token": users, "item_id:token": item, "timestamp:float": 1_600_000_000 + order * 60})
    inter["item_id:token"] = "i" + inter["item_id:token"].astype(str)
    inter.to_csv(folder / "synth.inter", sep="\t", index=False)


def tiny_model(folder: Path) -> Path:
    """A tiny random BERT with MiniLM's tokenizer (shipped, no download)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from llmemb_dist.llm.loading import shipped_model_path

    tok = AutoTokenizer.from_pretrained(shipped_model_path("minilm"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def settings(size: int) -> list[str]:
    root = CACHE / str(size)
    return [f"root={root / 'runs'}", "dataset.name=synth", "dataset.format=recbole", f"dataset.source={root / 'synth'}",
            "dataset.num_shards=8", f"model.path={tiny_model(CACHE / 'tiny-bert')}", "model.max_length=64",
            "ray.num_cpus=2", "tracking.enabled=false", f"embed.batch_size={BATCH}", "embed.adapter=none",
            "embed.num_actors=1", "embed.cpus_per_actor=1", "rat.embeddings=full", "rat.loss=sampled_softmax",
            "rat.epochs=1", "rat.patience=1", "rat.hidden=64", "rat.adapter_hidden=64", "rat.max_len=20",
            "rat.batch_size=1024", f"rat.eval.valid_users={VALID_USERS}", "rat.run=scale", "adapt.embeddings=full", "adapt.num_actors=1", "adapt.cpus_per_actor=1"]


# What a measured stage publishes the first time, under the name later stages read it by; a measured stage
# that finds its name taken publishes under a fresh one, so a remeasure never finds its work done.
CANONICAL = {"prepare": "synth", "changed": "changed", "added": "added", "embed": "full", "rat": "scale"}
NEEDS = {"bare": ["prepare"], "embed": ["prepare"], "incremental": ["changed", "embed"], "appended": ["added", "embed"],
         "rat": ["prepare", "embed"], "rat2": ["prepare", "embed"], "adapt": ["prepare", "embed", "rat"]}
KEY = {"prepare": "dataset.name", "changed": "dataset.name", "added": "dataset.name", "embed": "embed.version",
       "incremental": "embed.version", "appended": "embed.version", "rat": "rat.run", "rat2": "rat.run",
       "adapt": "adapt.version"}
CATALOGS = {"synth": {}, "changed": {"changed": CHANGED}, "added": {"added": ADDED}}


def command(stage: str, size: int, name: str) -> list[str]:
    """The stage's process, publishing under `name`."""
    if stage == "bare":
        return [sys.executable, __file__, "--bare-loop", str(size)]
    script = {"changed": "prepare", "added": "prepare", "incremental": "embed", "appended": "embed",
              "rat2": "rat"}.get(stage, stage)
    extra = {"changed": [f"dataset.source={CACHE / str(size) / 'changed'}"],
             "rat2": ["rat.num_workers=2", "rat.cpus_per_worker=1"],
             "added": [f"dataset.source={CACHE / str(size) / 'added'}"],
             "incremental": ["dataset.name=changed", "embed.incremental_from=full"],
             "appended": ["dataset.name=added", "embed.incremental_from=full"]}.get(stage, [])
    return [sys.executable, str(BENCH.parent / "launch" / f"{script}.py"), str(DEFAULT),
            *settings(size), *extra, f"{KEY[stage]}={name}"]


def published(stage: str, size: int) -> bool:
    from llmemb_dist import layout, storage
    from llmemb_dist.config import load_config

    cfg = load_config(DEFAULT, settings(size) + [f"{KEY[stage]}={CANONICAL[stage]}"])
    uri = {"embed": layout.embeddings_uri, "rat": layout.rat_result_uri}.get(stage, layout.dataset_uri)(cfg)
    return storage.is_published(uri)


def ensure_inputs(stage: str, size: int) -> None:
    """The catalogs and the published inputs the stage reads, made unmeasured where missing."""
    import subprocess

    root = CACHE / str(size)
    for name, edits in CATALOGS.items():
        if not (root / name / "synth.inter").is_file():
            print(f"writing the {name} catalog of {size:,} items", flush=True)
            write_catalog(root / name, size, **edits)
    for need in NEEDS.get(stage, []):
        if not published(need, size):
            ensure_inputs(need, size)
            print(f"making {need} at {size:,} items (not measured)", flush=True)
            subprocess.run(command(need, size, CANONICAL[need]), check=True, stdout=subprocess.DEVNULL)


def bare_loop(size: int) -> None:
    """The embedding job's model work without the job: prompts, tokenizer, forward, in one process."""
    import pyarrow.parquet as pq
    import torch

    from llmemb_dist.config import load_config
    from llmemb_dist.data.catalog import attribute_columns, item_attributes, render_prompt
    from llmemb_dist.layout import dataset_uri
    from llmemb_dist.llm.loading import PooledEncoder, load_backbone, load_tokenizer, resolve_model, tokenize
    from llmemb_dist import storage

    torch.set_num_threads(1)  # the job's one actor has one CPU
    cfg = load_config(DEFAULT, settings(size))
    tables = [pq.read_table(f) for f in storage.table_files(dataset_uri(cfg), "catalog")]
    columns = attribute_columns(tables[0].schema)
    source = resolve_model(cfg.model)
    tok, encoder = load_tokenizer(source), PooledEncoder(load_backbone(source, cfg.model).eval(), cfg.model.pooling)
    with torch.inference_mode():
        for table in tables:
            prompts = [render_prompt(cfg.model.instruction, item_attributes(r, columns)) for r in table.to_pylist()]
            for i in range(0, len(prompts), BATCH):
                encoder(**tokenize(tok, prompts[i:i + BATCH], cfg.model.max_length))


# The stage's own work, from its first block to its last write, where its log says it: the rest of the
# process is starting Python and Ray, planning, verifying and publishing.
WRITTEN = r"wrote \d+ embeddings in \d+ files in ([\d.]+) s"
WORK = {"embed": WRITTEN, "incremental": WRITTEN, "appended": WRITTEN, "adapt": r"published \S+ in ([\d.]+) s"}
PHASES = ("load", "train", "validate", "final", "ray_train", "publish")
RAT_PHASES = re.compile("time: " + ", ".join(rf"{p} (-?[\d.]+) s" for p in PHASES))  # the RAT driver's last line


def measure(stage: str, size: int) -> dict:
    ensure_inputs(stage, size)
    fresh = stage in CANONICAL and not published(stage, size)
    name = CANONICAL[stage] if fresh else f"{stage}-{time.strftime('%Y%m%d%H%M%S')}"
    seconds, log, peak = run_measured(command(stage, size, name))
    work = re.search(WORK[stage], log) if stage in WORK else None
    phases = RAT_PHASES.search(log) if stage.startswith("rat") else None
    extra = {}
    if phases:
        extra = {"phases": dict(zip(PHASES, map(float, phases.groups()))),
                 "events": int(re.search(r"items, (\d+) events", log)[1])}
    return {"stage": stage, "items": size, "seconds": seconds, "work_seconds": float(work[1]) if work else None,
            "items_per_s": size / seconds, **peak, **extra,
            "machine": MACHINE, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_results(rows: dict[str, dict]) -> None:
    from llmemb_dist.plots import plt, save

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({"rows": rows}, indent=1))
    ordered = sorted(rows.values(), key=lambda r: (STAGES.index(r["stage"]), r["items"]))
    lines = ["# Scale: the system's own costs against catalog size", "",
             "Produced by `python bench/scale.py` (see its docstring for the catalog, the tiny model and the settings). "
             "`s` is the whole process, Python and Ray start included; items/s is over it. `work s` is the stage's own "
             "work where its log gives it (first block read to last file written). Peak memory sampled every "
             "0.2 s: RSS (resident, object-store pages a process maps included) and USS (private). `bare` is one "
             "plain process with no Ray: its worker columns are empty.", "",
             "| stage | items | s | work s | items/s | driver RSS / USS MiB | busiest worker RSS / USS MiB | ran on | commit | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['items']:,} | {r['seconds']:.1f} | "
              f"{'' if r.get('work_seconds') is None else format(r['work_seconds'], '.1f')} | {r['items_per_s']:,.0f} | "
              f"{r['driver_rss_peak_mib']:.0f} / {r['driver_uss_peak_mib']:.0f} | "
              f"{r['worker_rss_peak_mib']:.0f} / {r['worker_uss_peak_mib']:.0f} | {r['machine']} | {r['commit']} | {r['date']} |"
              for r in ordered]
    timed = [r for r in ordered if "phases" in r]
    if timed:
        lines += ["", "RAT's time by phase (seconds, from the stage's log):", "",
                  "| stage | items | events | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 3) + "|"]
        lines += [f"| {r['stage']} | {r['items']:,} | {r['events']:,} | " +
                  " | ".join(f"{r['phases'][p]:.1f}" for p in PHASES) + " |" for r in timed]
    lines += ["", "The issues' aims (#19 embedding, #32 RAT), from the rows above:", "", "| aim | target | measured |", "|---|---|---|"]
    lines += aims(rows)
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        mine = [r for r in ordered if r["stage"] == stage]
        if mine:
            left.plot([r["items"] for r in mine], [r["seconds"] for r in mine], marker="o", label=stage)
            right.plot([r["items"] for r in mine], [r["driver_uss_peak_mib"] for r in mine], marker="o", label=stage)
    left.set(xscale="log", yscale="log", xlabel="catalog items", ylabel="seconds (whole process)", title="time")
    right.set(xscale="log", xlabel="catalog items", ylabel="driver peak USS (MiB)", title="driver memory")
    left.legend()
    right.legend()
    save(fig, RESULTS / "scale.png")
    print("\n".join(lines))


def aims(rows: dict[str, dict]) -> list[str]:
    out = []
    for size in sorted({r["items"] for r in rows.values()}):
        embed, bare, inc, app = (rows.get(f"{s}@{size}") for s in ("embed", "bare", "incremental", "appended"))
        if embed and bare:
            out.append(f"| embed job / bare loop at {size:,} items | >= 0.9x | {embed['items_per_s'] / bare['items_per_s']:.2f}x |")
        for row, what in ((inc, "5 % edited"), (app, "5 % added")):
            if embed and row:
                out.append(f"| incremental ({what}) / full at {size:,} items | <= 0.15x | {row['seconds'] / embed['seconds']:.2f}x |")
    sizes = sorted({r["items"] for r in rows.values()})
    out += rat_aims(rows, sizes)
    for small, big in zip(sizes, sizes[1:]):
        for stage in STAGES:
            a, b = rows.get(f"{stage}@{small}"), rows.get(f"{stage}@{big}")
            if a and b and stage not in ("bare", "rat", "rat2"):
                per_item = (b["seconds"] / big) / (a["seconds"] / small)
                out.append(f"| {stage}: per-item time {big:,} / {small:,} items | <= 1.2x | {per_item:.2f}x |")
                out.append(f"| {stage}: driver peak USS {big:,} / {small:,} items | <= 1.5x | "
                           f"{b['driver_uss_peak_mib'] / a['driver_uss_peak_mib']:.2f}x |")
    return out


def train_per_event(row: dict) -> float:
    """Seconds of optimizer steps per training event in its one epoch."""
    return row["phases"]["train"] / row["events"]


def rat_aims(rows: dict[str, dict], sizes: list[int]) -> list[str]:
    """Issue #32's: RAT grows with events, not the catalog; evaluation a small share; 2 workers as fast as 1."""
    out = []
    rat = {size: rows[f"rat@{size}"] for size in sizes if "phases" in rows.get(f"rat@{size}", {})}
    for small, big in zip(sorted(rat), sorted(rat)[1:]):
        out.append(f"| rat: train time per event {big:,} / {small:,} items | <= 1.2x | "
                   f"{train_per_event(rat[big]) / train_per_event(rat[small]):.2f}x |")
    if rat:
        small, big = min(rat), max(rat)
        if big > small:
            out.append(f"| rat: driver peak USS {big:,} / {small:,} items | <= 1.5x | "
                       f"{rat[big]['driver_uss_peak_mib'] / rat[small]['driver_uss_peak_mib']:.2f}x |")
        out.append(f"| rat: busiest worker peak USS at {big:,} items | <= 4096 MiB | {rat[big]['worker_uss_peak_mib']:.0f} MiB |")
        for size, row in sorted(rat.items()):
            share = row["phases"]["validate"] / (row["phases"]["train"] + row["phases"]["validate"])
            out.append(f"| rat: validation share of an epoch at {size:,} items ({VALID_USERS:,} users) | <= 25 % | "
                       f"{100 * share:.0f} % |")
    for size in sizes:
        one, two = rows.get(f"rat@{size}", {}), rows.get(f"rat2@{size}", {})
        if "phases" in one and "phases" in two:
            out.append(f"| rat: 2 workers x 1 CPU / 1 worker x 2 CPUs, events/s at {size:,} items | >= 0.9x | "
                       f"{train_per_event(one) / train_per_event(two):.2f}x |")
    return out


def main() -> None:
    if sys.argv[1:2] == ["--bare-loop"]:
        return bare_loop(int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES)
    parser.add_argument("--redo", action="store_true", help="measure again what the results already hold")
    args = parser.parse_args()
    path = RESULTS / "scale.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for size in sorted(args.sizes):
        for stage in [s for s in args.stages if args.redo or f"{s}@{size}" not in rows]:
            print(f"measuring {stage} at {size:,} items", flush=True)
            rows[f"{stage}@{size}"] = measure(stage, size)
            print(rows[f"{stage}@{size}"], flush=True)
            write_results(rows)


if __name__ == "__main__":
    main()
