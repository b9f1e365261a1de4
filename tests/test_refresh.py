"""The daily refresh as k8s/render.py schedules it: the rendered chain (import the day's catalog,
re-embed it incrementally, adapt it incrementally, index it for serving) run by a shell against the moto
S3 server, day after day."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.embeddings import vectors_of
from llmemb_dist.layout import adapted_uri, dataset_uri, embeddings_uri, index_uri, rat_result_uri
from llmemb_dist.stages.embed.driver import embed
from llmemb_dist.stages.index import serving
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.driver import rat

from conftest import REPO, start_local_ray

_spec = importlib.util.spec_from_file_location("k8s_render", REPO / "k8s" / "render.py")
render = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = render  # its dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(render)

CONFIG = {
    "dataset": {"name": "catalog-day1", "format": "recbole", "num_shards": 2},
    "model": {"path": "minilm", "pooling": "mean", "max_length": 32},
    "embed": {"version": "day1", "adapter": "none", "batch_size": 16, "num_actors": 1, "rows_per_file": 16},
    "rat": {"embeddings": "day1", "item_repr": "llm_gate", "hidden": 16, "adapter_hidden": 24, "epochs": 2,
            "patience": 2, "max_len": 20, "eval": {"num_negatives": 10}},
    "adapt": {"rows_per_file": 16},
    "ray": {"num_cpus": 2},
}


def upload_catalog(incoming: str, titles: dict[str, str], rng_seed: int = 0) -> None:
    """The day's drop in RecBole atomic form: every item, and interactions with the first 25 only (the
    rest of the catalog has no interactions, as new items do)."""
    rng = np.random.default_rng(rng_seed)
    items = ["item_id:token\ttitle:token_seq"] + [f"{item}\t{title}" for item, title in titles.items()]
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(40):
        for step, item in enumerate(rng.choice(25, size=6, replace=False)):
            inter.append(f"u{user}\tt{item}\t{1000 * user + step}")
    storage.write_bytes(storage.join(incoming, "toys.item"), ("\n".join(items) + "\n").encode())
    storage.write_bytes(storage.join(incoming, "toys.inter"), ("\n".join(inter) + "\n").encode())


def by_id(uri: str, table: str) -> dict[str, np.ndarray]:
    t = storage.read_table(uri, table)
    return dict(zip(t.column("item_id").to_pylist(), vectors_of(t)))


@pytest.mark.slow
def test_rendered_refresh_chain_imports_embeds_and_adapts_only_what_changed_and_indexes_it(s3_root, tmp_path):
    start_local_ray()
    bucket, prefix = s3_root.removeprefix("s3://").split("/", 1)
    incoming = f"s3://{bucket}/incoming/catalog/"
    config_file = tmp_path / "refresh.yaml"
    config_file.write_text(yaml.safe_dump({**CONFIG, "dataset": {**CONFIG["dataset"], "source": incoming}}))
    titles = {f"t{i}": f"toy {i} {'red blue green'.split()[i % 3]} set" for i in range(30)}

    # Before the schedule: the training data imported, embedded, and RAT trained on it.
    upload_catalog(incoming, titles)
    cfg = load_config(config_file, [f"root={s3_root}"])
    prepare(cfg)
    embed(cfg)
    rat(cfg)
    trained = by_id(rat_result_uri(cfg), "item_embeddings")
    assert len(trained) == 25  # RAT's items are the active ones

    values = copy.deepcopy(render.load_values()) | {"bucket": bucket, "prefix": prefix, "config": str(config_file)}
    values["refresh"] |= {"source": incoming, "dataset_prefix": "catalog", "gpus_per_worker": 0, "baseline_version": "day1"}
    template = render.dump([render.refresh_rayjob_template(values)])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)  # each command starts its own Ray, as on a fresh cluster

    def run_refresh(version: str, previous: str, adapt_from: str) -> None:
        """Fills the template's slots as the CronJob pod's sed does and runs the entrypoint in a shell."""
        text = template
        for slot, value in ((render.VERSION_SLOT, version), (render.PREVIOUS_SLOT, previous),
                            (render.ADAPT_FROM_SLOT, adapt_from)):
            text = text.replace(slot, value)
        command = yaml.safe_load(text)["spec"]["entrypoint"]
        out = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def day(version: str):
        return load_config(config_file, [f"root={s3_root}", f"dataset.name=catalog-{version}", f"embed.version={version}",
                                          f"adapt.version={version}", f"index.version={values['serve']['index_version']}"])

    # Day 2, the schedule's first run: three new items, two changed titles; every item adapted.
    titles2 = titles | {"t3": "toy 3 rebuilt", "t27": "toy 27 renamed"} | {f"t{i}": f"new toy {i}" for i in (30, 31, 32)}
    upload_catalog(incoming, titles2)
    run_refresh("day2", "day1", "")
    day2 = day("day2")
    assert sorted(storage.read_table(dataset_uri(day2), "catalog").column("item_id").to_pylist()) == sorted(titles2)
    assert storage.read_manifest(embeddings_uri(day2, "day2"))["counts"]["new"] == 5
    adapted2 = by_id(adapted_uri(day2), "item_embeddings")
    assert sorted(adapted2) == sorted(titles2)
    for item, vector in trained.items():
        if item != "t3":  # an unchanged trained item keeps RAT's vector, bit for bit
            assert np.array_equal(adapted2[item], vector), item
    assert not np.array_equal(adapted2["t3"], trained["t3"])
    # The version the RayService serves is the day's adapted version, new items included.
    live2 = storage.read_manifest(index_uri(day2))
    assert live2["inputs"]["adapted"]["uri"] == adapted_uri(day2) and live2["items"] == len(titles2)

    # Day 3: one new item and one changed one; only they are embedded and adapted.
    titles3 = titles2 | {"t10": "toy 10 rebuilt", "t33": "new toy 33"}
    upload_catalog(incoming, titles3)
    run_refresh("day3", "day2", "day2")
    day3 = day("day3")
    embedded3 = storage.read_manifest(embeddings_uri(day3, "day3"))
    assert embedded3["counts"]["new"] == 2
    manifest = storage.read_manifest(adapted_uri(day3))
    assert manifest["counts"] == {"items": 34, "computed": 2, "reused": 32, "removed": 0}
    # Day 2's files without t10 (16 rows a file) are copied on the store, the one with it rewritten.
    for published in (embedded3, manifest):
        assert published["carried_files"]["rewritten"] == 1 and published["carried_files"]["copied"] >= 1
    adapted3 = by_id(adapted_uri(day3), "item_embeddings")
    assert sorted(adapted3) == sorted(titles3)
    assert all(np.array_equal(adapted3[item], adapted2[item]) for item in adapted2 if item != "t10")
    # Republished over the same version, which is what the serving replicas watch and reload.
    live3 = storage.read_manifest(index_uri(day3))
    assert live3["inputs"]["adapted"]["uri"] == adapted_uri(day3) and live3["data_dir"] != live2["data_dir"]
    served = serving.load(index_uri(day3))
    assert served.data_dir == live3["data_dir"] and "t33" in served.recommender.item_ids

    # A retried RayJob finds every step published and does nothing: each stage's rerun test shows it
    # (test_prepare, test_embed, test_adapt); not repeated here, where it would cost three more processes.
