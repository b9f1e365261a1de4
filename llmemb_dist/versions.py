"""A stage's table of item vectors published as a new version, the same way by each stage that streams
whole tables (embed, adapt): which rows a previous version gives (`incremental_from`), and the publication
from the start of the tracked run to the commit, the table checked to hold every input row exactly once.

A stage passes what differs: its `Table`, whether a previous version was made from the same inputs, the
rows it computes and its own manifest fields.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llmemb_dist import blockio, storage, tracking
from llmemb_dist.config import Config, config_hash, to_dict
from llmemb_dist.data.embeddings import embeddings_schema
from llmemb_dist.progress import Progress


@dataclass(frozen=True)
class Table:
    """What a stage publishes: one table of (item_id, text_hash, embedding) rows, one per input item."""

    stage: str  # the stage, which names its config section and its tracked run
    kind: str  # the manifest's kind
    name: str  # the table's name in the publication
    what: str  # how messages name its rows
    uri: Callable[[Config, str], str]  # where its version of a given name lives (layout)

    def section(self, cfg: Config) -> Any:
        return getattr(cfg, self.stage)


def already_published(cfg: Config, table: Table, uri: str, inputs: dict) -> bool:
    """Whether `uri` holds a run from these inputs already, which is then left as it is."""
    return storage.already_published(uri, {"inputs": inputs}, table.what, differs="other inputs",
                                     hint=f"choose another {table.stage}.version")


@dataclass
class Previous:
    """The previous version an incremental run (`incremental_from`) carries rows over from."""

    uri: str
    manifest: dict
    carry: blockio.CarryOver


def previous_version(cfg: Config, table: Table, keys: blockio.Keys,
                     reusable: Callable[[str, dict], bool]) -> Previous | None:
    """The version the stage's `incremental_from` names and the rows of its table that the current `keys`
    (with lookups) still hold as they are; None for a full run, or when `reusable` (given the version's URI
    and manifest) finds it made from other inputs, then every row is computed. `reusable` says why in the
    stage's log, or raises where the run cannot go on."""
    name = table.section(cfg).incremental_from
    if not name:
        return None
    uri = table.uri(cfg, name)
    manifest = storage.read_manifest(uri)
    if not reusable(uri, manifest):
        return None
    return Previous(uri, manifest, blockio.carry_over(keys, storage.table_files(uri, table.name, manifest)))


@dataclass
class NewVersion:
    """A version being published: the stage writes its table through `write` and adds its own files and
    fields to `pub`, its final figures to `run`."""

    table: Table
    pub: storage.Publication
    run: tracking.StageRun
    keys: blockio.Keys  # the input's rows, which the table must hold exactly once
    rows_per_file: int
    schema: pa.Schema

    def write(self, computed, carry: blockio.CarryOver | None, progress: Progress | None) -> tuple[int, int]:
        """Writes the `computed` rows (a Ray Dataset, or None when there are none) and those `carry` takes
        from the previous version as the table; returns its (rows, files), once they are `keys`' rows
        exactly once."""
        meta = blockio.write_with_carry_over(computed, carry, storage.join(self.pub.data_uri, self.table.name),
                                             self.rows_per_file, progress)
        rows = blockio.verify(meta, self.keys, self.pub.uri, self.table.what)
        self.pub.add_table_files(self.table.name, [m["file"] for m in meta], rows, self.schema)
        return rows, len(meta)


@contextmanager
def publishing(cfg: Config, table: Table, uri: str, inputs: dict, keys: blockio.Keys, previous: Previous | None,
               dim: int) -> Iterator[NewVersion]:
    """The publication of `uri` in the stage's tracked run; after the stage's body, the manifest records
    the vectors' dimension and what was carried over from `previous`, and the version is committed."""
    section = table.section(cfg)
    with tracking.stage_run(cfg, table.stage, section.version) as run, storage.publish(
            uri, kind=table.kind, config=to_dict(cfg), config_hash=config_hash(section), inputs=inputs) as pub:
        yield NewVersion(table, pub, run, keys, section.rows_per_file, embeddings_schema(dim))
        pub.info.update(dim=dim, previous=previous and previous.uri,
                        carried_files=previous and previous.carry.file_counts())
        run.publish(pub)
