"""The RAT report: metrics as Markdown tables and PNG charts (head vs tail results, validation curves)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmemb_dist.plots import integer_ticks, plt, save
from llmemb_dist.stages.rat import significance

GROUPS = ("overall", "head", "tail", "short", "long")


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no results)"
    # Rows may come back from a JSON manifest with sorted keys: put names first and groups in GROUPS order.
    first = [c for c in ("model", "protocol", "group") if c in rows[0]]
    rank = {g: i for i, g in enumerate(GROUPS)}
    cols = first + sorted((c for c in rows[0] if c not in first), key=lambda c: (rank.get(c.split()[0], len(rank)), c))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def strongest_markdown(comparison: dict[str, Any] | None) -> str:
    """The main model against the strongest baseline (chosen on validation): test NDCG@10, full ranking."""
    if not comparison:
        return "(no baseline to compare with: the main model is the ID-only one)"
    rows = []
    for group in significance.GROUPS:  # a manifest's JSON has its keys sorted
        values = comparison["groups"][group]
        ratio = values["ratio"]
        rows.append({"group": group, comparison["model"]: values["model"], comparison["baseline"]: values["baseline"],
                     "ratio": "-" if ratio is None else f"{ratio:.3f}x", "paired p": f"{values['p_value']:.4f}",
                     "users": values["users"]})
    head = (f"{comparison['model']} against the strongest baseline, {comparison['baseline']} (chosen by "
            f"{comparison['selected_by']}); test NDCG@10, full ranking; p: paired sign-flip test over users\n\n")
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return head + "\n".join(lines)


def strongest_line(comparison: dict[str, Any] | None) -> str:
    """The comparison with the strongest baseline in one line, for the log."""
    if not comparison:
        return "no baseline to compare with (the main model is the ID-only one)"
    groups = comparison["groups"]
    ratios = ", ".join(f"{g} {'-' if groups[g]['ratio'] is None else format(groups[g]['ratio'], '.3f') + 'x'} "
                       f"(p {groups[g]['p_value']:.4f})" for g in significance.GROUPS)
    return f"{comparison['model']} against the strongest baseline, {comparison['baseline']}: test NDCG@10 {ratios}"


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """One table per protocol: every model and group, every metric, on the test split."""
    out = []
    for protocol in ("sampled", "full"):
        out.append(f"### Test, {protocol} ranking\n")
        rows = []
        for variant, summary in metrics["variants"].items():
            for group in GROUPS:
                values = summary["test"][protocol][group]
                rows.append({"model": variant, "group": group, **values})
        out.append(comparison_markdown(rows) + "\n")
    return "\n".join(out)


def cold_start_markdown(cold_start: dict[str, dict[str, dict[str, float]]]) -> str:
    """Models by rows, NDCG@10 and HR@10 of each cold-start group (stages/rat/cold.py) by columns."""
    rows = []
    for model, groups in cold_start.items():
        row: dict[str, Any] = {"model": model}
        for group, values in groups.items():
            row[f"{group} NDCG@10"] = values["NDCG@10"]
            row[f"{group} HR@10"] = values["HR@10"]
        row["cold users"] = groups["cold"]["users"]
        rows.append(row)
    return comparison_markdown(rows)


def plot_head_tail(metrics: dict[str, Any], path: Path, metric: str = "NDCG@10") -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    variants = list(metrics["variants"])
    width = 0.8 / max(1, len(variants))
    for ax, protocol in zip(axes, ("sampled", "full")):
        for i, variant in enumerate(variants):
            groups = metrics["variants"][variant]["test"][protocol]
            values = [groups[g][metric] for g in ("overall", "head", "tail")]
            ax.bar([x + i * width for x in range(3)], values, width, label=variant)
        sizes = metrics["variants"][variants[0]]["test"][protocol]
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(3)],
                      [f"{g}\n({sizes[g]['users']} users)" for g in ("overall", "head", "tail")])
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"test {metric} by target item group, {protocol} ranking")
        ax.legend()
    save(fig, path)


def plot_cold_start(cold_start: dict[str, dict[str, dict[str, float]]], path: Path, metric: str = "NDCG@10") -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    models = list(cold_start)
    groups = list(next(iter(cold_start.values())))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        ax.bar([x + i * width for x in range(len(groups))], [cold_start[model][g][metric] for g in groups], width, label=model)
    sizes = cold_start[models[0]]
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(groups))],
                  [f"{g}\n({sizes[g]['users']} users)" for g in groups])
    ax.set_ylabel(f"test {metric}, full ranking")
    ax.set_title("cold start: targets the recommender never trained on vs warm ones")
    ax.legend()
    save(fig, path)


def plot_validation(metrics: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = []
    for variant, summary in metrics["variants"].items():
        history = summary.get("history")
        if not history or history in drawn:  # references train nothing; a model scored two ways trained once
            continue
        drawn.append(history)
        checked = [h for h in history if "valid_ndcg10" in h]
        ax.plot([h["epoch"] for h in checked], [h["valid_ndcg10"] for h in checked], marker=".", label=variant)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("validation NDCG@10 per epoch (early stopping watches it)")
    integer_ticks(ax)
    ax.legend()
    save(fig, path)


def write_report(metrics: dict[str, Any], out_dir: Path) -> None:
    """report.md, head_tail.png and valid_curve.png into out_dir."""
    plot_head_tail(metrics, out_dir / "head_tail.png")
    plot_validation(metrics, out_dir / "valid_curve.png")
    lines = [
        "# RAT report\n",
        f"{metrics['users']} users ({metrics['dropped_users']} dropped with fewer than 3 events), {metrics['items']} items.\n",
    ]
    for variant, summary in metrics["variants"].items():
        if "best_epoch" in summary:
            lines.append(f"- {variant}: best epoch {summary['best_epoch']} of {summary['epochs']}")
    lines += ["", "## Against the strongest baseline\n", strongest_markdown(metrics.get("comparison")), "",
              metrics_markdown(metrics), "![head and tail](head_tail.png)", "", "![validation](valid_curve.png)", ""]
    if "cold_start" in metrics:
        plot_cold_start(metrics["cold_start"], out_dir / "cold_start.png")
        lines += ["## Cold start: test, full ranking over warm and cold items\n",
                  "Cold items were held out of training and validation; their vectors are the adapt stage's "
                  "for items without interactions (ID-only: the untrained start of an ID vector).\n",
                  cold_start_markdown(metrics["cold_start"]), "", "![cold start](cold_start.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
