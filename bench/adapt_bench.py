"""Throughput and memory of the adapt stage on synthetic catalogs a factor of 10 apart.

    python bench/adapt_bench.py [--sizes 100000 1000000] [--trained 50000]

A RAT publication (llm_gate, 384-d LLM vectors as MiniLM's, hidden 128, random weights: the transform's
cost does not depend on their values) trained on `--trained` items, and for each size an embeddings
version of that many items (the trained ones first, the rest new). Each size runs `launch/adapt.py` as
its own process on an embedded Ray (2 CPUs, one actor), alone on the machine: items/s over the stage's
own work (its log's "published ... in s"), and the peak memory of the driver and of the busiest Ray
worker (bench/procstat.py).
Writes bench/results/adapt.md, .json and .png; inputs are cached under bench/.cache/adapt/.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.embeddings import embeddings_table
from llmemb_dist.layout import embeddings_uri, rat_result_uri
from llmemb_dist.srs.items import build_items
from llmemb_dist.srs.placement import ItemPlacement
from llmemb_dist.stages.rat.driver import PLACEMENT_DIR
from procstat import run_measured

BENCH = Path(__file__).resolve().parent
ROOT = BENCH / ".cache" / "adapt"
RESULTS = BENCH / "results"
LLM_DIM, HIDDEN, ADAPTER_HIDDEN = 384, 128, 768
CHUNK = 100_000  # rows per generated Parquet file
ENCODER = {"encoder": "synthetic-384", "base_model": {"path": "synthetic", "fingerprint": "synthetic"}}
SETTINGS = ["ray.num_cpus=2", "adapt.num_actors=1", "adapt.cpus_per_actor=1", "adapt.batch_size=4096",
            "adapt.rows_per_file=100000"]


def item_id(k: int) -> str:
    return f"item-{k:09d}"


def vectors(start: int, stop: int) -> np.ndarray:
    return np.random.default_rng(start).standard_normal((stop - start, LLM_DIM), dtype=np.float32)


def publish_embeddings(cfg, version: str, size: int) -> str:
    uri = embeddings_uri(cfg, version)
    if storage.is_published(uri):
        return uri
    with storage.publish(uri, kind="embeddings", config={}, config_hash=version) as pub:
        folder = Path(pub.data_uri) / "embeddings"  # a local root: written chunk by chunk, never whole in memory
        folder.mkdir(parents=True)
        files = []
        for start in range(0, size, CHUNK):
            stop = min(size, start + CHUNK)
            ids = pa.array([item_id(k) for k in range(start, stop)], pa.string())
            hashes = pa.array([f"h{k}" for k in range(start, stop)], pa.string())
            table = embeddings_table(ids, hashes, vectors(start, stop))
            files.append(f"part-{start // CHUNK:05d}.parquet")
            pq.write_table(table, folder / files[-1])
        pub.add_table_files("embeddings", files, size, table.schema)
        pub.info.update(dim=LLM_DIM, **ENCODER)
    return uri


def publish_rat(cfg, trained: int, emb_uri: str) -> None:
    """A RAT publication with only what adapt reads: the placement and its manifest record."""
    uri = rat_result_uri(cfg)
    if storage.is_published(uri):
        return
    torch.manual_seed(0)
    popularity = np.r_[0, np.random.default_rng(1).integers(1, 100, trained)]
    items = build_items("llm_gate", trained, HIDDEN, ADAPTER_HIDDEN, vectors(0, trained), popularity)
    spec = {"item_repr": "llm_gate", "hidden": HIDDEN, "adapter_hidden": ADAPTER_HIDDEN, "llm_dim": LLM_DIM,
            "embeddings": {"uri": emb_uri, "data_dir": storage.read_manifest(emb_uri)["data_dir"], **ENCODER}}
    with torch.no_grad():
        placement = ItemPlacement(items, spec, [item_id(k) for k in range(trained)], [f"h{k}" for k in range(trained)],
                                  items.table())
    with storage.publish(uri, kind="rat", config={}, config_hash="synthetic") as pub, tempfile.TemporaryDirectory() as d:
        placement.save(d)
        pub.upload_dir(d, PLACEMENT_DIR)
        pub.info["placement"] = {"folder": PLACEMENT_DIR, **spec}


def measure(version: str, size: int, trained: int) -> dict:
    """One `launch/adapt.py` run, with the peak memory of its driver and of its busiest Ray worker."""
    out_version = f"bench-{size}-{time.strftime('%Y%m%d%H%M%S')}"
    argv = [sys.executable, str(BENCH.parent / "launch" / "adapt.py"), f"root={ROOT}", f"adapt.embeddings={version}",
            f"adapt.version={out_version}", f"rat.run=synthetic-{trained}", *SETTINGS]
    seconds, log, peak = run_measured(argv)
    counts = storage.read_manifest(storage.join(str(ROOT), "adapted", out_version))["counts"]
    # The stage's own time, from reading the first block to the manifest: what grows with the catalog.
    stage = re.search(r"published \S+ in ([\d.]+) s", log)
    stage_s = float(stage[1]) if stage else math.nan
    return {"items": size, "computed": counts["computed"], "seconds": seconds, "stage_seconds": stage_s,
            "items_per_s": size / stage_s, **peak}


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    from llmemb_dist.plots import plt, save

    RESULTS.mkdir(exist_ok=True)
    machine = f"{platform.node()}, {psutil.cpu_count()} CPUs"
    command = "python bench/adapt_bench.py " + " ".join(sys.argv[1:])
    (RESULTS / "adapt.json").write_text(json.dumps({"command": command, "machine": machine, "trained": args.trained,
                                                    "settings": SETTINGS, "rows": rows}, indent=1))
    lines = ["# adapt: throughput and memory against catalog size", "",
             f"`{command}` on {machine}, {time.strftime('%Y-%m-%d')}. RAT trained on {args.trained} items "
             f"(llm_gate, {LLM_DIM}-d LLM vectors, hidden {HIDDEN}); every run adapts a whole embeddings version "
             f"(nothing carried over) with `{' '.join(SETTINGS)}`, as its own process, alone on the machine. "
             "`process s` is the whole run, starting Python and Ray included; `stage s` is the stage's own work, "
             "from the first block read to the manifest (items/s is over it). Peak memory, sampled every 0.2 s: "
             "RSS (resident, object-store pages a process maps included) and USS (its private memory: what "
             "it holds itself).", "",
             "| items | computed | process s | stage s | items/s | driver RSS / USS MiB | busiest worker RSS / USS MiB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['items']:,} | {r['computed']:,} | {r['seconds']:.1f} | {r['stage_seconds']:.1f} | {r['items_per_s']:,.0f} | "
              f"{r['driver_rss_peak_mib']:.0f} / {r['driver_uss_peak_mib']:.0f} | "
              f"{r['worker_rss_peak_mib']:.0f} / {r['worker_uss_peak_mib']:.0f} |" for r in rows]
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        grow = {k: big[f"{k}_peak_mib"] / small[f"{k}_peak_mib"] for k in ("driver_rss", "driver_uss", "worker_rss", "worker_uss")}
        lines += ["", f"From {small['items']:,} to {big['items']:,} items ({big['items'] / small['items']:.0f}x): stage time "
                  f"{big['stage_seconds'] / small['stage_seconds']:.1f}x; driver RSS {grow['driver_rss']:.2f}x, USS "
                  f"{grow['driver_uss']:.2f}x; busiest worker RSS {grow['worker_rss']:.2f}x, USS {grow['worker_uss']:.2f}x. "
                  "The items beyond the smaller catalog took "
                  f"{(big['stage_seconds'] - small['stage_seconds']) / (big['items'] - small['items']) * 1e6:.1f} s per million "
                  "(the stage's fixed cost, starting its actor pool, is in both runs)."]
    (RESULTS / "adapt.md").write_text("\n".join(lines) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r["items"] for r in rows]
    left.plot(sizes, [r["stage_seconds"] for r in rows], marker="o", label="stage")
    left.plot(sizes, [r["seconds"] for r in rows], marker="o", label="process (with Ray start)")
    left.set(xscale="log", yscale="log", xlabel="items", ylabel="seconds", title="adapt: time")
    left.legend()
    for who in ("driver", "worker"):
        for kind in ("rss", "uss"):
            right.plot(sizes, [r[f"{who}_{kind}_peak_mib"] for r in rows], marker="o",
                       label=f"{'driver' if who == 'driver' else 'busiest Ray worker'} {kind.upper()}")
    right.set(xscale="log", xlabel="items", ylabel="peak memory (MiB)", title="adapt: memory")
    right.legend()
    save(fig, RESULTS / "adapt.png")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--trained", type=int, default=50_000)
    args = parser.parse_args()
    cfg = load_config(None, [f"root={ROOT}", f"rat.run=synthetic-{args.trained}"])
    first = publish_embeddings(cfg, f"synthetic-{args.trained}", args.trained)
    publish_rat(cfg, args.trained, first)
    rows = []
    for size in sorted(args.sizes):
        version = f"synthetic-{size}"
        publish_embeddings(cfg, version, size)
        rows.append(measure(version, size, args.trained))
        print(rows[-1], flush=True)
    write_results(rows, args)


if __name__ == "__main__":
    main()
