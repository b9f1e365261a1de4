"""The catalog and interactions contracts, and how an item's attributes become a prompt.

SCFT, embedding and RAT all read items through this module, so a prompt is
rendered one way everywhere and `text_hash` means the same thing in every stage.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Sequence

import pandas as pd
import pyarrow as pa

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


def refuse_rows(bad: pd.Series, message: Callable[[int], str]) -> None:
    """Raises DataError with `message(row)` for the first True row of a boolean column, if any."""
    if bad.any():
        raise DataError(message(int(bad.to_numpy().argmax())))


def validate_catalog(df: pd.DataFrame, source: str) -> None:
    """Raises DataError naming `source` (a file) and the offending field or row."""
    if ITEM_ID not in df.columns:
        raise DataError(f"{source}: missing required column {ITEM_ID!r} (columns: {list(df.columns)})")
    if df.empty:
        raise DataError(f"{source}: the catalog is empty")
    if not attribute_columns(list(df.columns)):
        raise DataError(f"{source}: the catalog has no attribute columns besides {ITEM_ID!r}")
    ids = df[ITEM_ID]
    refuse_rows(ids.isna() | (ids.astype(str).str.strip() == ""), lambda row: f"{source}: row {row} has an empty {ITEM_ID!r}")
    refuse_rows(ids.duplicated(), lambda row: f"{source}: duplicate {ITEM_ID} {ids.iloc[row]!r} at row {row}")


def refuse_undescribed_items(df: pd.DataFrame, source: str) -> None:
    """An item whose kept attributes are all empty has no text for the LLM: the embedding stage could
    not embed it, so the import refuses it (with its row) before SCFT spends any time."""
    columns = attribute_columns(list(df.columns))
    empty = pd.Series(True, index=df.index)
    for col in columns:
        empty &= df[col].isna() | (df[col].astype(str).str.strip() == "")
    refuse_rows(empty, lambda row: f"{source}: row {row} (item {df[ITEM_ID].iloc[row]!r}) has every attribute "
                                   f"({', '.join(columns)}) empty: nothing describes it; fill one in or drop the item")


def validate_interactions(df: pd.DataFrame, known_items: set[str], source: str) -> None:
    missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing required column {missing[0]!r} (columns: {list(df.columns)})")
    unknown = ~df[ITEM_ID].isin(known_items)
    refuse_rows(unknown, lambda row: f"{source}: row {row} names item {df[ITEM_ID].iloc[row]!r}, which is not in the "
                                     f"catalog ({int(unknown.sum())} such rows)")


HASH_SLICE = 100_000  # rows whose attributes are Python objects at once while their text hashes are computed


def catalog_table(df: pd.DataFrame) -> pa.Table:
    """The catalog schema: item_id, one nullable string column per attribute, text_hash."""
    columns = attribute_columns(list(df.columns))
    table = pa.table({ITEM_ID: _strings(df[ITEM_ID].astype(str)), **{col: _strings(df[col]) for col in columns}})
    hashes = []
    for start in range(0, table.num_rows, HASH_SLICE):
        hashes += [text_hash(item_attributes(r, columns)) for r in table.slice(start, HASH_SLICE).to_pylist()]
    return table.append_column(TEXT_HASH, pa.array(hashes, pa.string()))


def interactions_table(df: pd.DataFrame) -> pa.Table:
    return pa.table(
        {
            USER_ID: _strings(df[USER_ID].astype(str)),
            ITEM_ID: _strings(df[ITEM_ID].astype(str)),
            TIMESTAMP: pa.array(df[TIMESTAMP].astype("int64").to_numpy(), pa.int64()),
        }
    )


def _strings(column: pd.Series) -> pa.Array:
    """A text column as one Arrow string array (a missing value as null), without a Python list of it."""
    return pa.array(column, pa.string(), from_pandas=True)
