"""Where every stage's outputs live under `<root>`: the one place that builds run paths.

```
<root>/datasets/<dataset.name>/                 prepare: catalog + interactions
<root>/scft/<scft.run>/checkpoints/             SCFT: Ray Train storage (resumable)
<root>/scft/<scft.run>/adapter/                 SCFT: the published LoRA adapter
<root>/embeddings/<embed.version>/              embed: item_id, text_hash, embedding
<root>/rat/<rat.run>/checkpoints/<variant>/     RAT: Ray Train storage per trained model
<root>/rat/<rat.run>/result/                    RAT: item embeddings, model, metrics, report
<root>/adapted/<adapt.version>/                 adapt: every item of an embeddings version, in RAT's space
<root>/index/<index.version>/                   index: a FAISS index over an adapted version, for top-k serving
<root>/reports/<rat.run>/                       pipeline: the run report
```
Stages find each other's outputs here, never by importing each other.
"""
from __future__ import annotations

from llmemb_dist import storage
from llmemb_dist.config import Config


def dataset_uri(cfg: Config) -> str:
    return storage.join(cfg.root, "datasets", cfg.dataset.name)


def scft_run_uri(cfg: Config) -> str:
    """Ray Train storage of the SCFT run (its `checkpoints/` folder) and home of the published adapter."""
    return storage.join(cfg.root, "scft", cfg.scft.run)


def adapter_uri(cfg: Config) -> str:
    return storage.join(scft_run_uri(cfg), "adapter")


def scft_fault_marker(cfg: Config) -> str:
    """Written when scft.fail_at_step has fired, so a resumed run does not fail again."""
    return storage.join(scft_run_uri(cfg), "fault_injected")


def embeddings_uri(cfg: Config, version: str | None = None) -> str:
    """An embeddings version under the root; `embed.version` by default."""
    return storage.join(cfg.root, "embeddings", version or cfg.embed.version)


def rat_input_embeddings_uri(cfg: Config) -> str:
    """What RAT reads: `rat.embeddings` is a version under the root, or a URI of its own."""
    return version_or_uri(cfg, cfg.rat.embeddings)


def version_or_uri(cfg: Config, name: str) -> str:
    """A name of an embeddings version under the root, or a URI (or path) of its own, as given."""
    return name if ("://" in name or "/" in name) else embeddings_uri(cfg, name)


def rat_checkpoints_uri(cfg: Config) -> str:
    return storage.join(cfg.root, "rat", cfg.rat.run, "checkpoints")


def rat_result_uri(cfg: Config) -> str:
    """The publication of a RAT run: item embeddings, model, metrics and report."""
    return storage.join(cfg.root, "rat", cfg.rat.run, "result")


def report_uri(cfg: Config) -> str:
    return storage.join(cfg.root, "reports", cfg.rat.run)


def adapt_input_embeddings_uri(cfg: Config) -> str:
    """What adapt reads: `adapt.embeddings` (a version or a URI), else the current `embed.version`."""
    return version_or_uri(cfg, cfg.adapt.embeddings or cfg.embed.version)


def adapted_uri(cfg: Config, version: str | None = None) -> str:
    return storage.join(cfg.root, "adapted", version or cfg.adapt.version)


def index_input_adapted_uri(cfg: Config) -> str:
    """What the index stage reads: `index.adapted`, else the current `adapt.version`."""
    return adapted_uri(cfg, cfg.index.adapted or cfg.adapt.version)


def index_uri(cfg: Config, version: str | None = None) -> str:
    return storage.join(cfg.root, "index", version or cfg.index.version)
