"""The fair comparison: the default (llm_gate with the text channel) against the strongest baseline, each
tuned on validation over the same grid, trained to its own early stop under the same step budget, over
three seeds, with a paired test over users. Full ranking, test NDCG@10.

    python bench/baselines.py --datasets ml-100k --backbones sasrec     # one cell group; resumable
    python bench/baselines.py                                           # the three datasets, SASRec

Baselines: most-popular, text-only (cosine of the LLM vectors to the last item), ID-only and ID-only with
the same text channel (the RAT stage's: its weight chosen on validation on the same `rat.text_weights`
grid). ID-only and ID+text come from the same trained models, scored without and with the channel, and
each is tuned on its own validation figure. Tuning: every grid point trains once with seed 1; the point
with the best seed-1 validation NDCG@10 is the method's, and it trains with seeds 2 and 3 too. The
strongest baseline is the one with the best mean validation NDCG@10 over the seeds. Per-user NDCG@10 is
averaged over the seeds before the paired sign-flip test (stages/rat/significance.py); the spread is the
standard deviation over seeds (ddof 1).

Each trained model is a cell, cached in bench/results/baselines.json with its command, machine and
commit, so a rerun (a fresh checkout too) trains only what is missing; the Markdown and PNG are rebuilt
from every cell after each one. SCFT and the embeddings come from bench/quality.py's cache (its
`full` setting's SCFT run and the MiniLM embeddings of each catalog).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from procstat import MACHINE, commit
from quality import CACHE, DATASETS, RESULTS, SHIPPED, base_config, llm_table, write_atomic

from llmemb_dist.data import real
from llmemb_dist.data.sequences import Sequences
from llmemb_dist.srs import build_model
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.evaluate import make_split
from llmemb_dist.stages.rat.inputs import load_sequences
from llmemb_dist.stages.rat.references import reference_results
from llmemb_dist.stages.rat.significance import GROUPS, paired_p_value, per_user_ndcg
from llmemb_dist.stages.rat.trainer import fit

RESULTS_JSON = RESULTS / "baselines.json"
SEEDS = (1, 2, 3)
# The same budget for every model: a validation check every 20 optimizer steps, stopping after 10 checks
# without a better validation NDCG@10, so a small dataset trains as long as a large one; 300 epochs a cap.
BUDGET = ["rat.epochs=300", "rat.patience=10", "rat.eval_every_steps=20", "rat.loss=ce",
          "rat.eval.select_protocol=full"]
GRID = {"rat.dropout": [0.2, 0.5], "rat.max_len": [50, 200]}
MAIN = "llm_gate"
ID_ONLY, ID_TEXT = "id", "id+text"

log = logging.getLogger("baselines")


def grid_points(grid: dict[str, list]) -> list[tuple[str, ...]]:
    points = [()]
    for key, values in grid.items():
        points = [p + (f"{key}={v}",) for p in points for v in values]
    return points


def cell_key(dataset: str, backbone: str, item_repr: str, point: tuple[str, ...], seed: int) -> str:
    return "|".join([dataset, backbone, item_repr, " ".join(point), f"seed{seed}"])


def load_cells() -> dict:
    return json.loads(RESULTS_JSON.read_text())["cells"] if RESULTS_JSON.exists() else {}


class Cells:
    """The measured cells, saved after each one so an interrupted run resumes."""

    def __init__(self, command: str):
        self.cells, self.command, self.code = load_cells(), command, commit()

    def save(self, key: str, cell: dict) -> None:
        self.cells[key] = {**cell, "command": self.command, "machine": MACHINE, "code": self.code,
                           "finished": time.strftime("%Y-%m-%d %H:%M")}
        RESULTS.mkdir(exist_ok=True)
        write_atomic(RESULTS_JSON, json.dumps({"cells": self.cells}, indent=1))


def summary_of(valid: dict, test: dict, test_ranks: np.ndarray) -> dict:
    return {"valid": valid["full"]["overall"]["NDCG@10"],
            "test": {g: test["full"][g]["NDCG@10"] for g in GROUPS}, "test_ranks": test_ranks.tolist()}


def train(cfg, data: Sequences, backbone: str, item_repr: str, llm: np.ndarray, srs: np.ndarray | None):
    """One model to its own early stop; the ID-only one is scored with and without the text channel."""
    torch.manual_seed(cfg.rat.seed)
    model = build_model(cfg.rat, backbone, item_repr, data.num_items, llm, data.train_popularity())
    started = time.perf_counter()
    result = fit(model, data, cfg.rat, srs=srs if item_repr != "id" else None)
    cell = {"best_epoch": result.best_epoch, "epochs": len(result.history), "text_weight": result.text_weight,
            "seconds": time.perf_counter() - started,
            "scored": summary_of(result.valid, result.test, result.test_ranks)}
    if item_repr == "id":
        plain = result.without_text
        cell["plain"] = summary_of(plain["valid"], plain["test"], plain["test_ranks"])
    return model, cell


class Group:
    """One (dataset, backbone): its data, LLM table, references and the cells it trains."""

    def __init__(self, dataset: str, backbone: str, cells: Cells):
        self.dataset, self.backbone, self.cells = dataset, backbone, cells
        self.cfg = base_config(dataset, "minilm", "full", BUDGET)
        prepare(self.cfg)
        self.data = load_sequences(self.cfg)
        self.llm = llm_table(self.cfg, dataset, "minilm", self.data.item_ids, tuned=True)

    def config(self, point: tuple[str, ...], seed: int):
        return base_config(self.dataset, "minilm", "full", BUDGET + list(point) + [f"rat.seed={seed}"])

    def srs_path(self, point: tuple[str, ...], seed: int) -> Path:
        name = cell_key(self.dataset, "sasrec", "id", point, seed).replace("|", "_").replace(" ", "_")
        return CACHE / "baselines-srs" / f"{name}.npy"

    def cell(self, backbone: str, item_repr: str, point: tuple[str, ...], seed: int) -> dict:
        """The cell, trained first where no measurement holds it. An LLM cell aligns to the ID-only SASRec of
        its grid point and seed, whose item table is kept in the cache (trained again where a fresh checkout
        has the cell but not the table)."""
        key = cell_key(self.dataset, backbone, item_repr, point, seed)
        if key in self.cells.cells:
            return self.cells.cells[key]
        srs = None
        if item_repr != "id":
            if not self.srs_path(point, seed).exists():
                self.train_and_save("sasrec", "id", point, seed, None)
            srs = np.load(self.srs_path(point, seed))
        return self.train_and_save(backbone, item_repr, point, seed, srs)

    def train_and_save(self, backbone: str, item_repr: str, point: tuple[str, ...], seed: int,
                       srs: np.ndarray | None) -> dict:
        key = cell_key(self.dataset, backbone, item_repr, point, seed)
        log.info("cell %s", key)
        model, cell = train(self.config(point, seed), self.data, backbone, item_repr, self.llm, srs)
        if (backbone, item_repr) == ("sasrec", "id"):
            self.srs_path(point, seed).parent.mkdir(parents=True, exist_ok=True)
            np.save(self.srs_path(point, seed), model.items.table().detach().numpy())
        self.cells.save(key, cell)
        log.info("cell %s: test NDCG@10 %.4f (best epoch %d of %d, %.0f s)", key, cell["scored"]["test"]["overall"],
                 cell["best_epoch"], cell["epochs"], cell["seconds"])
        return self.cells.cells[key]

    def tuned(self, item_repr: str, scoring: str, points: list[tuple[str, ...]]) -> tuple[tuple[str, ...], list[dict]]:
        """The grid point with the best seed-1 validation NDCG@10 under `scoring` ("scored" or "plain"), and
        its cells over every seed."""
        first = {p: self.cell(self.backbone, item_repr, p, SEEDS[0]) for p in points}
        best = max(points, key=lambda p: first[p][scoring]["valid"])
        return best, [self.cell(self.backbone, item_repr, best, s)[scoring] for s in SEEDS]

    def run(self, points: list[tuple[str, ...]]) -> dict:
        valid, test = make_split(self.data, "valid", self.cfg.rat.eval), make_split(self.data, "test", self.cfg.rat.eval)
        methods = {}
        for name, result in reference_results(self.data, self.llm, self.cfg.rat, valid, test).items():
            methods[name] = {"point": None, "seeds": [summary_of(result["valid"], result["test"], result["test_ranks"])]}
        for name, item_repr, scoring in ((ID_ONLY, "id", "plain"), (ID_TEXT, "id", "scored"), (MAIN, MAIN, "scored")):
            point, seeds = self.tuned(item_repr, scoring, points)
            methods[name] = {"point": list(point), "seeds": seeds}
        return aggregate(methods, test.head)


def aggregate(methods: dict, head: np.ndarray) -> dict:
    """Mean and spread over seeds per method, the strongest baseline by validation, and the main model's
    ratios and paired p-values against it."""
    out = {"methods": {}}
    per_user = {}
    for name, m in methods.items():
        seeds = m["seeds"]
        per_user[name] = np.mean([per_user_ndcg(np.array(s["test_ranks"])) for s in seeds], axis=0)
        spread = {g: statistics.stdev([s["test"][g] for s in seeds]) if len(seeds) > 1 else 0.0 for g in GROUPS}
        out["methods"][name] = {"point": m["point"], "seeds": len(seeds),
                                "valid": statistics.mean(s["valid"] for s in seeds),
                                "test": {g: statistics.mean(s["test"][g] for s in seeds) for g in GROUPS},
                                "std": spread}
    baselines = [n for n in methods if n != MAIN]
    strongest = max(baselines, key=lambda n: out["methods"][n]["valid"])
    masks = {"overall": np.ones(len(head), dtype=bool), "head": head, "tail": ~head}
    out["strongest"] = strongest
    out["against"] = {}
    for name in baselines:
        out["against"][name] = {
            g: {"ratio": (out["methods"][MAIN]["test"][g] / out["methods"][name]["test"][g]
                          if out["methods"][name]["test"][g] > 0 else None),
                "p_value": paired_p_value(per_user[MAIN][masks[g]], per_user[name][masks[g]])}
            for g in GROUPS}
    return out


def markdown(groups: dict, command: str) -> str:
    lines = ["# The default against the strongest baseline, tuned the same way", "",
             f"Command: `{command}`. Machine and commit of each cell: `baselines.json`. Full ranking, test NDCG@10, "
             f"mean ± standard deviation (ddof 1) over seeds {', '.join(map(str, SEEDS))}; grid "
             f"{', '.join(f'{k} {v}' for k, v in GRID.items())} chosen on seed-1 validation per method; budget "
             f"`{' '.join(BUDGET)}`; p: paired sign-flip test over test users of the seed-averaged per-user NDCG@10.", ""]
    for name, group in groups.items():
        strongest = group["strongest"]
        lines += [f"## {name}", "", f"Strongest baseline (by mean validation NDCG@10): **{strongest}**.", "",
                  "| method | grid point | valid | overall | head | tail | vs strongest: overall | head | tail |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, m in group["methods"].items():
            cells = [f"{m['test'][g]:.4f} ± {m['std'][g]:.4f}" for g in GROUPS]
            if method == MAIN:
                against = group["against"][strongest]
                ratios = [("-" if against[g]["ratio"] is None else f"{against[g]['ratio']:.3f}x")
                          + f" (p {against[g]['p_value']:.4f})" for g in GROUPS]
            else:
                ratios = [""] * 3
            point = " ".join(m["point"]) if m["point"] else "-"
            lines.append(f"| {method} | {point} | {m['valid']:.4f} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(groups: dict, path: Path) -> None:
    from llmemb_dist.plots import plt, save

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (name, group) in zip(axes[0], groups.items()):
        methods = list(group["methods"])
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            m = group["methods"][method]
            ax.bar(np.arange(3) + i * width, [m["test"][g] for g in GROUPS], width,
                   yerr=[m["std"][g] for g in GROUPS], label=f"{method} (n={m['seeds']})")
        ax.set_xticks(np.arange(3) + width * (len(methods) - 1) / 2, list(GROUPS))
        ax.set_ylabel("test NDCG@10, full ranking")
        ax.set_title(f"{name}: strongest baseline {group['strongest']}", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["ml-100k", "ml-latest-small", "amazon-toys"])
    parser.add_argument("--backbones", nargs="+", choices=["sasrec", "bert4rec", "gru4rec"], default=["sasrec"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    for name in set(args.datasets) - SHIPPED:
        DATASETS[name].append(f"dataset.source={real.dataset_or_exit(name)}")
    command = "python bench/baselines.py " + shlex.join(sys.argv[1:])
    cells, points, groups = Cells(command), grid_points(GRID), {}
    for dataset in args.datasets:
        for backbone in args.backbones:
            groups[f"{dataset}, {backbone}"] = Group(dataset, backbone, cells).run(points)
            write_atomic(RESULTS / "baselines.md", markdown(groups, command))
            plot(groups, RESULTS / "baselines.png")
    print((RESULTS / "baselines.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
