"""The whole system in one command: prepare -> SCFT -> embed -> RAT (-> adapt -> index with pipeline.index),
then the run report.

Each stage skips itself when its output is already published from the same config and
inputs (it compares manifests), so a second run does nothing, and a run after a crash
resumes at the first stage that did not publish.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

from llmemb_dist import layout, storage
from llmemb_dist.config import Config, ConfigError, to_dict
from llmemb_dist.distributed.cluster import init_ray
from llmemb_dist.stages.adapt.driver import adapt
from llmemb_dist.stages.embed.driver import embed
from llmemb_dist.stages.index.driver import index
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.driver import rat
from llmemb_dist.stages.rat.report import comparison_markdown, strongest_markdown
from llmemb_dist.stages.scft.driver import scft

log = logging.getLogger(__name__)

Stage = tuple[str, Callable[[Config], str]]
STAGES: tuple[Stage, ...] = (
    ("prepare", prepare),
    ("scft", scft),
    ("embed", embed),
    ("rat", rat),
)
SERVING: tuple[Stage, ...] = (("adapt", adapt), ("index", index))  # with pipeline.index


def stages(cfg: Config) -> tuple[Stage, ...]:
    """The stages `cfg` runs, in order; refused before any runs where the serving ones could not."""
    if not cfg.pipeline.index:
        return STAGES
    if cfg.rat.item_repr == "id":
        raise ConfigError("pipeline.index=true needs rat.item_repr with a text side to adapt the catalog with; "
                          "rat.item_repr is 'id'")
    return STAGES + SERVING


def pipeline(cfg: Config) -> str:
    """Runs every stage that has not published yet, then publishes the report; returns the report URI."""
    chain = stages(cfg)
    init_ray(cfg.ray, cfg.log.verbose)
    outputs: dict[str, str] = {}
    started = time.time()
    for i, (name, stage) in enumerate(chain, start=1):
        log.info("stage %d/%d %s: starting", i, len(chain), name)
        t = time.time()
        outputs[name] = stage(cfg)
        log.info("stage %d/%d %s: done in %.0f s -> %s", i, len(chain), name, time.time() - t, outputs[name])
    manifests = {name: storage.read_manifest(out) for name, out in outputs.items()}
    uri = publish_report(cfg, outputs, manifests)
    full = [row for row in manifests["rat"]["metrics"] if row["protocol"] == "full"]  # sampled: in the report
    served = f"Top-k index (launch/serve.py serves it): {outputs['index']}\n" if "index" in outputs else ""
    print(
        f"\nAdapted item embeddings (the product): {storage.join(outputs['rat'], 'item_embeddings')}\n{served}"
        f"LLM item embeddings: {storage.join(outputs['embed'], 'embeddings')}\n"
        f"SCFT adapter (peft): {storage.join(outputs['scft'], 'adapter')}\nReport: {storage.join(uri, 'report.md')}\n\n"
        f"Test, full ranking:\n{comparison_markdown(full)}\n\n{strongest_markdown(manifests['rat'].get('comparison'))}"
        f"\n\npipeline finished in {time.time() - started:.0f} s"
    )
    return uri


def publish_report(cfg: Config, outputs: dict[str, str], manifests: dict[str, dict]) -> str:
    """report.md with the comparison table and the PNGs of SCFT (loss) and RAT (validation, head/tail)."""
    uri = layout.report_uri(cfg)
    inputs = {name: manifest["data_dir"] for name, manifest in manifests.items()}
    # A report follows its inputs: one made from older outputs is replaced, not refused.
    if storage.already_published(uri, {"inputs": inputs}, "report", replace=True):
        return uri
    scft_data = storage.data_uri(outputs["scft"], manifests["scft"])
    rat_data = storage.data_uri(outputs["rat"], manifests["rat"])
    with tempfile.TemporaryDirectory() as tmp, storage.publish(
        uri, kind="report", config=to_dict(cfg), config_hash=manifests["rat"]["config_hash"],
        inputs=inputs, overwrite=True,
    ) as pub:
        folder = Path(tmp)
        storage.download_dir(storage.join(scft_data, "plots"), folder / "scft")
        storage.download_dir(storage.join(rat_data, "report"), folder / "rat")
        pngs = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
        pub.upload_dir(folder / "scft", "scft")
        pub.upload_dir(folder / "rat", "rat")
        pub.write_text("report.md", _report_markdown(cfg, outputs, manifests, pngs))
    return uri


def _report_markdown(cfg: Config, outputs: dict[str, str], manifests: dict[str, dict], pngs: list[Path]) -> str:
    scft_manifest = manifests["scft"]
    lines = [
        f"# llmemb-dist pipeline report: {cfg.dataset.name}, {cfg.model.path}\n",
        "| stage | output |",
        "|---|---|",
        *[f"| {name} | `{uri}` |" for name, uri in outputs.items()],
        "",
        f"SCFT: {scft_manifest['steps']} steps on {scft_manifest['workers']} workers, "
        f"final loss {scft_manifest['final_loss']:.4f}.\n",
        "## LLMEmb against the baselines (test split)\n",
        strongest_markdown(manifests["rat"].get("comparison")),
        "",
        comparison_markdown(manifests["rat"]["metrics"]),
        "",
        *[f"![{p.stem}]({p.as_posix()})\n" for p in pngs],
        "Every group (short and long users too) under both protocols: [rat/report.md](rat/report.md).",
    ]
    return "\n".join(lines)
