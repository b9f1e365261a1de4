"""Top-k serving through the index stage's FAISS indexes on synthetic catalogs a factor of 10 apart.

    python bench/serve.py [--runs 100000:exact,hnsw,ivf 1000000:hnsw,ivf] [--set index.nlist=1024 ...]
                          [--build-threads 2] [--note ...]

Item vectors in the layout the default recommender scores with: RAT's 128 dimensions (rat.hidden) and the
text channel's 384 (MiniLM's, at unit length), 512 in all; a query is a user, `[user_repr, w * t(last item)]`
with w = 4. They are drawn from a seeded low-rank model, as learned embeddings are: 1,000 topics in a
32-dimensional latent space, mapped by fixed random matrices to the two sides, plus noise; a user is near a
random item in the latent space, and its last item is that item. For each size and kind, built by the index
stage's own code (stages/index/kinds.py) with its default parameters but for `--set` (by default IVF's
nlist 1,024 and nprobe 32): the build time on
`--build-threads` threads, recall@10 against exact search on 1,000 seeded queries, the latency of one top-10
query at a time on one thread (p50, p99), single-threaded throughput (queries one at a time: what one replica
serves) and batched throughput (the 1,000 queries in one call on the build threads).
Writes bench/results/serve.md and .json; rows measured before with other sizes or parameters are kept there,
each with the note, date and commit of its run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from llmemb_dist.config import load_config
from llmemb_dist.stages.index import kinds
from procstat import MACHINE, commit

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, TEXT_DIM, TEXT_WEIGHT = 128, 384, 4.0
LATENT, TOPICS = 32, 1_000
QUERIES, K = 1_000, 10
CHUNK = 100_000  # items generated at a time
IVF = ["index.nlist=1024", "index.nprobe=32"]  # --set's default: cells for catalogs of about 10^5-10^6
AIMS = {"p50_ms": 5.0, "p99_ms": 20.0, "recall": 0.95, "qps_100k": 500.0, "build_1m_s": 120.0}


class Space:
    """The fixed latent model every catalog and query set is drawn from."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.topics = rng.standard_normal((TOPICS, LATENT), dtype=np.float32)
        self.to_id = rng.standard_normal((LATENT, HIDDEN), dtype=np.float32) / math.sqrt(LATENT)
        self.to_text = rng.standard_normal((LATENT, TEXT_DIM), dtype=np.float32) / math.sqrt(LATENT)

    def latent(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.topics[rng.integers(0, TOPICS, n)] + 0.7 * rng.standard_normal((n, LATENT), dtype=np.float32)

    def text(self, rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
        t = z @ self.to_text + 0.3 * rng.standard_normal((len(z), TEXT_DIM), dtype=np.float32)
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    def items(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 512) item vectors and their latent points."""
        out, latent = np.empty((n, HIDDEN + TEXT_DIM), np.float32), np.empty((n, LATENT), np.float32)
        for start in range(0, n, CHUNK):
            rng = np.random.default_rng([1, start])
            z = latent[start: start + CHUNK] = self.latent(rng, min(CHUNK, n - start))
            out[start: start + len(z), :HIDDEN] = z @ self.to_id + 0.1 * rng.standard_normal((len(z), HIDDEN), dtype=np.float32)
            out[start: start + len(z), HIDDEN:] = self.text(rng, z)
        return out, latent

    def users(self, items: np.ndarray, latent: np.ndarray, n: int) -> np.ndarray:
        """(n, 512) user vectors, each near a random item, which is also its last item."""
        rng = np.random.default_rng(2)
        last = rng.integers(0, len(items), n)
        z = latent[last] + 0.7 * rng.standard_normal((n, LATENT), dtype=np.float32)
        return np.hstack([z @ self.to_id, TEXT_WEIGHT * items[last, HIDDEN:]]).astype(np.float32)


def measure(items: np.ndarray, queries: np.ndarray, truth: np.ndarray, kind: str, args: argparse.Namespace) -> dict:
    import faiss

    build_threads = args.build_threads
    params = kinds.resolve(load_config(None, [f"index.kind={kind}", *args.set]).index, len(items), "bench")
    started = time.perf_counter()
    index = kinds.build(items, params, build_threads)
    build_s = time.perf_counter() - started
    batch_started = time.perf_counter()
    _, found = index.search(queries, K)
    batch_qps = len(queries) / (time.perf_counter() - batch_started)
    faiss.omp_set_num_threads(1)
    latencies = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], K)
        latencies.append(time.perf_counter() - t)
    faiss.omp_set_num_threads(build_threads)
    ms = np.array(latencies) * 1e3
    return {"items": len(items), "kind": kind, "params": params, "build_s": build_s,
            "recall_at_10": kinds.recall(found, truth), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "qps_1_thread": len(ms) / (ms.sum() / 1e3),
            "qps_batched": batch_qps, "build_threads": build_threads, "note": args.note,
            "date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": "python bench/serve.py " + " ".join(sys.argv[1:])}


def merged(rows: list[dict]) -> list[dict]:
    """These rows, and those of earlier runs in serve.json with another size or other parameters."""
    path = RESULTS / "serve.json"
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    mine = {(r["items"], json.dumps(r["params"], sort_keys=True)) for r in rows}
    kept = [r for r in earlier if (r["items"], json.dumps(r["params"], sort_keys=True)) not in mine]
    return sorted(kept + rows, key=lambda r: (r["items"], ["exact", "hnsw", "ivf"].index(r["kind"])))


def verdicts(rows: list[dict]) -> list[str]:
    """Each aim, met or not, by the row it is judged on."""
    lines = []
    for r in rows:
        if r["kind"] == "exact":
            continue
        if r["items"] >= 1_000_000:
            ok = r["p50_ms"] <= AIMS["p50_ms"] and r["p99_ms"] <= AIMS["p99_ms"] and r["recall_at_10"] >= AIMS["recall"]
            lines.append(f"- {r['kind']} at {r['items']:,}: p50 {r['p50_ms']:.2f} ms (aim <= 5), p99 {r['p99_ms']:.2f} ms "
                         f"(aim <= 20), recall@10 {r['recall_at_10']:.3f} (aim >= 0.95): {'met' if ok else 'NOT met'}; "
                         f"build {r['build_s']:.0f} s (aim <= 120 on 2 cores): "
                         f"{'met' if r['build_s'] <= AIMS['build_1m_s'] else 'NOT met'}")
        elif r["items"] == 100_000:
            lines.append(f"- {r['kind']} at 100,000: {r['qps_1_thread']:,.0f} queries/s on one thread, one at a time "
                         f"(aim >= 500): {'met' if r['qps_1_thread'] >= AIMS['qps_100k'] else 'NOT met'}")
    return lines


def write_results(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"machine": MACHINE, "aims": AIMS, "rows": rows}, indent=1))
    run_of = [(r["command"], r["date"], r["commit"], r["build_threads"], r["note"]) for r in rows]
    runs = list(dict.fromkeys(run_of))
    lines = ["# serve: top-10 through the index stage's FAISS indexes", "",
             f"On {MACHINE}. Synthetic catalogs in the default recommender's layout ({HIDDEN} + {TEXT_DIM} text "
             f"columns = {HIDDEN + TEXT_DIM} dimensions, inner product; bench/serve.py says how they are drawn). "
             f"Build on the run's build threads; recall@10 against exact search over {QUERIES:,} seeded queries; "
             "latency of one query at a time on one thread; `qps 1 thread` is that loop's rate, `qps batched` the "
             f"{QUERIES:,} queries in one call on the build threads. The user vector's own cost (the backbone over "
             "the history) is not in these figures.", "",
             "| run | items | kind | parameters | build s | recall@10 | p50 ms | p99 ms | qps 1 thread | qps batched |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, run in zip(rows, run_of):
        run = 1 + runs.index(run)
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items() if k not in ("kind", "seed")) or "-"
        lines.append(f"| {run} | {r['items']:,} | {r['kind']} | {params} | {r['build_s']:.1f} | {r['recall_at_10']:.4f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['qps_1_thread']:,.0f} | {r['qps_batched']:,.0f} |")
    lines += ["", "Runs:", ""]
    lines += [f"{n}. `{command}`, {date}, at {at}, {threads} build threads. {note}"
              for n, (command, date, at, threads, note) in enumerate(runs, 1)]
    lines += ["", "Against the aims (p50 <= 5 ms, p99 <= 20 ms, recall@10 >= 0.95 at 10^6 items on one CPU; >= 500 "
              "queries/s at 10^5; a 10^6 build in <= 2 minutes on 2 cores):", "", *verdicts(rows)]
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["100000:exact,hnsw,ivf", "1000000:hnsw,ivf"],
                        help="SIZE:KIND[,KIND...]: the index kinds to build over a catalog of SIZE items")
    parser.add_argument("--set", nargs="+", default=IVF, help="index.* config overrides for every index built")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--note", default="", help="how the machine was used meanwhile (other jobs, nice)")
    args = parser.parse_args()
    runs = {int(size): spec.split(",") for size, _, spec in (run.partition(":") for run in args.runs)}
    space, rows = Space(), []
    for size in sorted(runs):
        items, latent = space.items(size)
        queries = space.users(items, latent, QUERIES)
        truth = kinds.exact_top(queries, items, K)
        for kind in runs[size]:
            rows.append(measure(items, queries, truth, kind, args))
            print(json.dumps(rows[-1]), flush=True)
    write_results(merged(rows))


if __name__ == "__main__":
    main()
