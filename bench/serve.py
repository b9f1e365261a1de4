"""Top-k serving through the index stage's FAISS indexes on synthetic catalogs a factor of 10 apart.

    python bench/serve.py [--runs 100000:exact,hnsw,ivf 1000000:hnsw,ivf] [--set index.nlist=1024 ...]
                          [--build-threads 2] [--note ...]
    python bench/serve.py --incremental 100000:0.05,0.2,0.5 [--set ...] [--build-threads 2] [--note ...]

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

`--incremental SIZE:SHARE[,SHARE...]`: an IVF index over a catalog of SIZE items, and the next catalog, in
which SHARE of them changed (a third left, a third got a new vector, a third are new), drawn once from the
catalog's own topics and once from topics it did not have (the worst case for cells trained on the first).
Timed: the update the stage makes with `index.incremental_from` (stages/index/incremental.py: the
previous index read from its bytes, the changed items found, removed and added), the same trained cells
filled anew with every vector (what the update must answer like, and does: same labels and scores for the
1,000 queries) and a build of the new catalog from scratch (k-means included); recall@10 against exact
search over the new catalog of the update and of the build.

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
from llmemb_dist.data import index_files
from llmemb_dist.stages.index import incremental, kinds
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

    def vectors(self, rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
        """The item vectors of latent points `z`."""
        ids = z @ self.to_id + 0.1 * rng.standard_normal((len(z), HIDDEN), dtype=np.float32)
        return np.hstack([ids, self.text(rng, z)]).astype(np.float32)

    def items(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 512) item vectors and their latent points."""
        out, latent = np.empty((n, HIDDEN + TEXT_DIM), np.float32), np.empty((n, LATENT), np.float32)
        for start in range(0, n, CHUNK):
            rng = np.random.default_rng([1, start])
            z = latent[start: start + CHUNK] = self.latent(rng, min(CHUNK, n - start))
            out[start: start + len(z)] = self.vectors(rng, z)
        return out, latent

    def changed(self, items: np.ndarray, latent: np.ndarray, share: float,
                new_topics: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The next catalog of `items` (ids "0", "1", ...): `share` of them changed, a third left, a third
        given a new vector, a third new (ids "new-0", ...), their latent points from the catalog's topics or
        from as many topics it did not have; its ids, vectors and latent points, in a shuffled order."""
        rng = np.random.default_rng(3)
        order, third = rng.permutation(len(items)), int(len(items) * share / 3)
        left, edited = order[:third], order[third: 2 * third]
        fresh = rng.standard_normal((TOPICS, LATENT), dtype=np.float32)
        if new_topics:
            z = fresh[rng.integers(0, TOPICS, 2 * third)] + 0.7 * rng.standard_normal((2 * third, LATENT), dtype=np.float32)
        else:
            z = self.latent(rng, 2 * third)
        latent = latent.copy()
        latent[edited] = z[:third]
        vectors = items.copy()
        vectors[edited] = self.vectors(rng, z[:third])
        stay = np.setdiff1d(np.arange(len(items)), left)
        ids = [str(k) for k in stay] + [f"new-{k}" for k in range(third)]
        vectors, latent = np.vstack([vectors[stay], self.vectors(rng, z[third:])]), np.vstack([latent[stay], z[third:]])
        shuffled = rng.permutation(len(ids))
        return [ids[k] for k in shuffled], vectors[shuffled], latent[shuffled]

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


class First:
    """A catalog and its IVF index, as the previous version publishes it."""

    def __init__(self, space: Space, size: int, args: argparse.Namespace):
        import faiss

        self.items, self.latent = space.items(size)
        self.params = kinds.resolve(load_config(None, ["index.kind=ivf", *args.set]).index, size, "bench")
        self.index = kinds.build(self.items, self.params, args.build_threads)
        self.published = faiss.serialize_index(self.index)


def measure_update(space: Space, first: First, share: float, new_topics: bool, args: argparse.Namespace) -> dict:
    import faiss

    threads, size, params, published = args.build_threads, len(first.items), first.params, first.published
    ids, new_items, new_latent = space.changed(first.items, first.latent, share, new_topics)
    queries = space.users(new_items, new_latent, QUERIES)
    truth = kinds.exact_top(queries, new_items, K)

    started = time.perf_counter()
    index = faiss.deserialize_index(published)
    read_s = time.perf_counter() - started
    change = incremental.changes(index, np.arange(size), [str(k) for k in range(size)], ids, new_items)
    diff_s = time.perf_counter() - started - read_s
    change.apply(index, new_items)
    update_s = time.perf_counter() - started
    started = time.perf_counter()
    refilled = faiss.clone_index(first.index)
    refilled.reset()
    refilled.add_with_ids(new_items, change.labels)
    refill_s = time.perf_counter() - started
    started = time.perf_counter()
    rebuilt = kinds.build(new_items, params, threads)
    rebuild_s = time.perf_counter() - started

    updated, same_cells = index.search(queries, K), refilled.search(queries, K)
    rows = index_files.label_rows(change.labels)
    return {"items": size, "share": share, "topics": "new" if new_topics else "the catalog's", "params": params,
            "removed": len(change.stale), "added": len(change.rows), "update_s": update_s, "read_s": read_s,
            "diff_s": diff_s, "refill_s": refill_s, "rebuild_s": rebuild_s,
            "recall_update": kinds.recall(index_files.rows_of(updated[1], rows), truth),
            "recall_rebuild": kinds.recall(rebuilt.search(queries, K)[1], truth),
            "update_equals_refill": bool(np.array_equal(updated[1], same_cells[1])
                                         and np.array_equal(updated[0], same_cells[0])),
            "build_threads": threads, "note": args.note, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "command": "python bench/serve.py " + " ".join(sys.argv[1:])}


def merged(rows: list[dict], key: str = "rows") -> list[dict]:
    """These rows, and those of earlier runs in serve.json's `key` with another size or other parameters."""
    def same(r: dict) -> tuple:
        return r["items"], r.get("share"), r.get("topics"), json.dumps(r["params"], sort_keys=True)

    path = RESULTS / "serve.json"
    earlier = json.loads(path.read_text()).get(key, []) if path.exists() else []
    mine = {same(r) for r in rows}
    kept = [r for r in earlier if same(r) not in mine]
    if key == "incremental":
        return sorted(kept + rows, key=lambda r: (r["items"], r["topics"] == "new", r["share"]))
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


def write_results(rows: list[dict], updates: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"machine": MACHINE, "aims": AIMS, "rows": rows,
                                                    "incremental": updates}, indent=1))
    run_of = [(r["command"], r["date"], r["commit"], r["build_threads"], r["note"]) for r in rows + updates]
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
        lines.append(f"| {1 + runs.index(run)} | {r['items']:,} | {r['kind']} | {described(r['params'])} | "
                     f"{r['build_s']:.1f} | {r['recall_at_10']:.4f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['qps_1_thread']:,.0f} | {r['qps_batched']:,.0f} |")
    if updates:
        lines += ["", "## The next catalog: an IVF index updated (`index.incremental_from`) or built again", "",
                  "A share of the catalog changed (a third left, a third with a new vector, a third new), drawn "
                  "from its own topics or from topics it did not have. `update s`: the previous index read from "
                  "its bytes, the changed items found by comparing its vectors with the new ones, removed and "
                  "added (in brackets: the read, and the finding); `same cells s`: every vector of the new "
                  "catalog added to the "
                  "previous index's trained cells, emptied; `build s`: the new catalog's index from scratch, "
                  "k-means included. `update = same cells`: the update's labels and scores for the queries are "
                  "those of the same cells filled anew. The stage's reads and writes of the index file, and "
                  "its load of the vectors, are not in these figures (the same for both, but for the update's "
                  "read of the previous index file).", "",
                  "| run | items | parameters | changed | from topics | removed | added | update s (read, find) | "
                  "same cells s | build s | recall@10 updated | recall@10 built | update = same cells |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r, run in zip(updates, run_of[len(rows):]):
            lines.append(f"| {1 + runs.index(run)} | {r['items']:,} | {described(r['params'])} | {r['share']:.0%} | "
                         f"{r['topics']} | {r['removed']:,} | {r['added']:,} | {r['update_s']:.2f} "
                         f"({r['read_s']:.2f}, {r['diff_s']:.2f}) | {r['refill_s']:.2f} | {r['rebuild_s']:.1f} | "
                         f"{r['recall_update']:.4f} | {r['recall_rebuild']:.4f} | "
                         f"{'yes' if r['update_equals_refill'] else 'NO'} |")
    lines += ["", "Runs:", ""]
    lines += [f"{n}. `{command}`, {date}, at {at}, {threads} build threads. {note}"
              for n, (command, date, at, threads, note) in enumerate(runs, 1)]
    lines += ["", "Against the aims (p50 <= 5 ms, p99 <= 20 ms, recall@10 >= 0.95 at 10^6 items on one CPU; >= 500 "
              "queries/s at 10^5; a 10^6 build in <= 2 minutes on 2 cores):", "", *verdicts(rows)]
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def described(params: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items() if k not in ("kind", "seed")) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["100000:exact,hnsw,ivf", "1000000:hnsw,ivf"],
                        help="SIZE:KIND[,KIND...]: the index kinds to build over a catalog of SIZE items")
    parser.add_argument("--incremental", nargs="+", default=[],
                        help="SIZE:SHARE[,SHARE...]: instead of --runs, an IVF index over SIZE items updated to "
                        "the next catalog with SHARE of them changed, against building it again")
    parser.add_argument("--set", nargs="+", default=IVF, help="index.* config overrides for every index built")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--note", default="", help="how the machine was used meanwhile (other jobs, nice)")
    args = parser.parse_args()
    space, rows, updates = Space(), [], []
    for size, _, shares in (spec.partition(":") for spec in args.incremental):
        first = First(space, int(size), args)
        for share in map(float, shares.split(",")):
            for new_topics in (False, True):
                updates.append(measure_update(space, first, share, new_topics, args))
                print(json.dumps(updates[-1]), flush=True)
    specs = [] if args.incremental else (run.partition(":") for run in args.runs)
    runs = {int(size): spec.split(",") for size, _, spec in specs}
    for size in sorted(runs):
        items, latent = space.items(size)
        queries = space.users(items, latent, QUERIES)
        truth = kinds.exact_top(queries, items, K)
        for kind in runs[size]:
            rows.append(measure(items, queries, truth, kind, args))
            print(json.dumps(rows[-1]), flush=True)
    write_results(merged(rows), merged(updates, "incremental"))


if __name__ == "__main__":
    main()
