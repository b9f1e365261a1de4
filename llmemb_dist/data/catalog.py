"""The catalog and interactions contracts, and how an item's attributes become a prompt.

SCFT, embedding and RAT all read items through this module, so a prompt is
rendered one way everywhere and `text_hash` means the same thing in every stage.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmemb_dist.storage import DataError

ITEM_ID = "item_id"
TEXT_HASH = "text_hash"
USER_ID = "user_id"
TIMESTAMP = "timestamp"
INTERACTION_COLUMNS = (USER_ID, ITEM_ID, TIMESTAMP)


def attribute_columns(schema: pa.Schema | Sequence[str]) -> list[str]:
    names = schema.names if isinstance(schema, pa.Schema) else list(schema)
    return [n for n in names if n not in (ITEM_ID, TEXT_HASH)]


def item_attributes(row: dict, columns: Sequence[str]) -> list[tuple[str, str]]:
    """The item's non-empty attributes as (key, value), in column order."""
    out = []
    for col in columns:
        value = row.get(col)
        if not pd.isna(value) and str(value).strip():  # pandas 3 stores a missing string as NaN, not None
            out.append((col.replace("_", " "), str(value).strip()))
    return out


def attribute_text(attrs: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{key} is {value}" for key, value in attrs)


def render_prompt(instruction: str, attrs: Sequence[tuple[str, str]]) -> str:
    """The design's prompt: the instruction, a newline, then `key is value` joined by '; '."""
    return f"{instruction}\n{attribute_text(attrs)}"


def text_hash(attrs: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(attribute_text(attrs).encode()).hexdigest()[:32]


def augment(attrs: Sequence[tuple[str, str]], drop_ratio: float, rng: random.Random) -> list[tuple[str, str]]:
    """One augmented view: shuffle the attributes, then drop int(n * ratio) of them, keeping at least one.

    An item with one attribute (amazon-toys has only a title) would give two identical views, which the
    contrastive loss separates from other items at once (loss near 0 from the first steps) without
    learning anything; the reference keeps no attribute at all (a bare instruction). Here int(n * ratio)
    of that value's n words are dropped instead, keeping at least one and the words' order.
    """
    view = list(attrs)
    if len(view) == 1:
        key, value = view[0]
        words = value.split()
        keep = max(1, len(words) - int(len(words) * drop_ratio))
        return [(key, " ".join(words[i] for i in sorted(rng.sample(range(len(words)), keep))))]
    rng.shuffle(view)
    keep = max(1, len(view) - int(len(view) * drop_ratio))
    return view[:keep]


def refuse_rows(bad: pd.Series | np.ndarray, message: Callable[[int], str]) -> None:
    """Raises DataError with `message(row)` for the first True row of a boolean column, if any."""
    bad = np.asarray(bad)
    if bad.any():
        raise DataError(message(int(bad.argmax())))


def validate_catalog_ids(columns: Sequence[str], ids: pa.Array, source: str) -> None:
    """Raises DataError naming `source` (a file) and the offending field or row."""
    if not len(ids):
        raise DataError(f"{source}: the catalog is empty")
    if not attribute_columns(columns):
        raise DataError(f"{source}: the catalog has no attribute columns besides {ITEM_ID!r}")
    refuse_rows(_blank(ids), lambda row: f"{source}: row {row} has an empty {ITEM_ID!r}")
    if pc.count_distinct(ids).as_py() != len(ids):
        duplicated = ids.to_pandas().duplicated()
        refuse_rows(duplicated, lambda row: f"{source}: duplicate {ITEM_ID} {ids[row].as_py()!r} at row {row}")


def refuse_undescribed_items(table: pa.Table, source: str, first_row: int = 0) -> None:
    """An item whose kept attributes are all empty has no text for the LLM: the embedding stage could
    not embed it, so the import refuses it (with its row) before SCFT spends any time."""
    columns = attribute_columns(table.schema)
    empty = np.ones(table.num_rows, dtype=bool)
    for col in columns:
        empty &= _blank(table[col])
    refuse_rows(empty, lambda row: f"{source}: row {row + first_row} (item {table[ITEM_ID][row].as_py()!r}) has every "
                                   f"attribute ({', '.join(columns)}) empty: nothing describes it; fill one in or drop the item")


def _blank(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Missing or only whitespace, per value."""
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True).to_numpy(zero_copy_only=False)


HASH_SLICE = 100_000  # rows whose attributes are Python objects at once while their text hashes are computed


def catalog_table(df: pd.DataFrame) -> pa.Table:
    """The catalog schema: item_id, one nullable string column per attribute, text_hash."""
    columns = attribute_columns(list(df.columns))
    return with_text_hash(pa.table({ITEM_ID: _strings(df[ITEM_ID].astype(str)), **{col: _strings(df[col]) for col in columns}}))


def with_text_hash(table: pa.Table) -> pa.Table:
    """`table` (item_id and string attribute columns) with the text_hash column appended."""
    columns = attribute_columns(table.schema)
    hashes = []
    for start in range(0, table.num_rows, HASH_SLICE):
        hashes += [text_hash(item_attributes(r, columns)) for r in table.slice(start, HASH_SLICE).to_pylist()]
    return table.append_column(TEXT_HASH, pa.array(hashes, pa.string()))


def _strings(column: pd.Series) -> pa.Array:
    """A text column as one Arrow string array (a missing value as null), without a Python list of it."""
    return pa.array(column, pa.string(), from_pandas=True)
