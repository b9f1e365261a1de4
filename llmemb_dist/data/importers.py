"""Readers for the raw dataset formats; each returns (items, interactions) as DataFrames.

items: `item_id` plus one string column per attribute. interactions: user_id,
item_id, timestamp (int64 seconds), in file order. Errors name the file and line.
"""
from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from llmemb_dist.data.catalog import ITEM_ID, TIMESTAMP, USER_ID, refuse_rows
from llmemb_dist.storage import DataError

RECBOLE_PREFIX = "recbole:"


def read_dataset(fmt: str, source: str, metadata: str = "", timestamp_unit: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    if fmt == "recbole":
        return read_recbole(resolve_recbole_source(source), timestamp_unit)
    if fmt == "movielens_csv":
        return read_movielens_csv(Path(source), timestamp_unit)
    if fmt == "amazon":
        if not metadata:
            raise DataError("dataset.metadata: the amazon format needs the metadata JSON lines file")
        return read_amazon(Path(source), Path(metadata), timestamp_unit)
    raise DataError(f"dataset.format: unknown format {fmt!r}")


def resolve_recbole_source(source: str) -> Path:
    """`recbole:<name>` is an example dataset shipped inside the recbole wheel (found without importing it)."""
    if not source.startswith(RECBOLE_PREFIX):
        return Path(source)
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset.source {source!r} needs the recbole wheel: pip install --no-deps recbole==1.2.1")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / source[len(RECBOLE_PREFIX):]


# ---------------------------------------------------------------- RecBole atomic files


def read_recbole(folder: Path, timestamp_unit: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    inter_file = _one_file(folder, ".inter")
    item_file = _one_file(folder, ".item")
    items = _read_atomic(item_file)
    if ITEM_ID not in items.columns:
        raise DataError(f"{item_file}: missing required column {ITEM_ID!r} (columns: {list(items.columns)})")
    inter = _read_atomic(inter_file)
    for col in (USER_ID, ITEM_ID, TIMESTAMP):
        if col not in inter.columns:
            raise DataError(f"{inter_file}: missing required column {col!r} (columns: {list(inter.columns)})")
    inter[TIMESTAMP] = _int_timestamps(inter[TIMESTAMP], inter_file, 2, timestamp_unit)
    return items, inter[[USER_ID, ITEM_ID, TIMESTAMP]]


def _one_file(folder: Path, suffix: str) -> Path:
    if not folder.is_dir():
        raise DataError(f"dataset.source: {folder} is not a folder")
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise DataError(f"{folder}: expected one *{suffix} file, found {[p.name for p in found]}")
    return found[0]


ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")  # RecBole's field types; every value is read as text


def _read_atomic(path: Path) -> pd.DataFrame:
    """An atomic file: a tab-separated header of `name:type` fields; every value is read as text."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\n").lstrip("\ufeff").split("\t")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of the first line); re-encode the file as UTF-8") from None
    names = []
    for i, field in enumerate(header):
        name, sep, kind = field.partition(":")
        if not sep:
            raise DataError(f"{path}: header field {i} ({field!r}) is not of the form name:type")
        if kind not in ATOMIC_TYPES:
            raise DataError(f"{path}: header field {i} ({field!r}) has type {kind!r}, which this importer cannot "
                            f"read; RecBole atomic types are {', '.join(ATOMIC_TYPES)}")
        names.append(name)
    return _read_tab_separated(path, names).to_pandas(types_mapper=PANDAS_STRINGS.get)


# Arrow strings read into pandas' own string dtype: one buffer per column, not a Python object per value.
PANDAS_STRINGS = {pa.string(): pd.StringDtype(storage="pyarrow", na_value=np.nan)}


def _read_tab_separated(path: Path, names: list[str]) -> pa.Table:
    """The rows after the header, every value as text, read by Arrow's multi-threaded parser (a 10^7-row
    file in seconds, without a Python object per value). No quoting: a quote is part of the value."""
    ragged = []

    def refuse(row) -> str:
        ragged.append(row)
        return "error"

    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=refuse),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        if ragged:
            where = _first_ragged_line(path, len(names)) or f"the line {ragged[0].text[:80]!r}"
            raise DataError(f"{path}: {where} has {ragged[0].actual_columns} tab-separated fields where the header "
                            f"has {len(names)}") from None
        if "invalid UTF8" in str(e):
            raise DataError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None
        raise DataError(f"{path}: {e}") from None


UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000}
LATEST = 4_102_444_800  # 2100-01-01 in seconds: no interaction happens later
MODERN = 100_000_000  # 1973 in seconds: a millisecond or microsecond clock of real events is past it


def _int_timestamps(values: pd.Series, source: Path, first_line: int, unit: str) -> pd.Series:
    """Timestamps as int64 seconds (to the second) from `unit`; `auto` tells the unit by magnitude."""
    numeric = _numbers(values)
    refuse_rows(numeric.isna() | ~np.isfinite(numeric),
                lambda row: f"{source}: line {row + first_line}: timestamp {values.iloc[row]!r} is not a number")
    if unit == "auto":
        unit = _timestamp_unit(numeric, values, source, first_line)
    seconds = numeric / UNIT_PER_SECOND[unit]
    refuse_rows((seconds < 0) | (seconds > LATEST),
                lambda row: f"{source}: line {row + first_line}: timestamp {values.iloc[row]!r} is no time between 1970 "
                            f"and 2100 in {unit} (dataset.timestamp_unit={unit})")
    return np.floor(seconds).astype("int64")


def _numbers(values: pd.Series) -> pd.Series:
    """The text column as float64; a value that is no number becomes NaN."""
    try:  # Arrow's cast parses without a Python object per value
        return pd.Series(pc.cast(pa.array(values, pa.string()), pa.float64()).to_numpy(), index=values.index)
    except pa.ArrowInvalid:  # some value is no number: pandas tells which (NaN), at Python speed
        return pd.to_numeric(values, errors="coerce")


def _timestamp_unit(numeric: pd.Series, values: pd.Series, source: Path, first_line: int) -> str:
    """The coarsest unit that puts the latest timestamp before 2100; a finer one needs every timestamp past
    1973 in it, or the column mixes units (or counts something other than time) and is refused."""
    latest = int(numeric.to_numpy().argmax())
    unit = next((u for u, per in UNIT_PER_SECOND.items() if numeric.iloc[latest] / per <= LATEST), None)
    if unit is None:
        raise DataError(f"{source}: line {latest + first_line}: timestamp {values.iloc[latest]!r} is past 2100 even "
                        "in microseconds; set dataset.timestamp_unit if it is a time")
    if unit != "s":
        early = numeric / UNIT_PER_SECOND[unit] < MODERN
        refuse_rows(early, lambda row: f"{source}: timestamps mix units: line {latest + first_line} has "
                                       f"{values.iloc[latest]!r} (in {unit}) and line {row + first_line} "
                                       f"{values.iloc[row]!r}; set dataset.timestamp_unit (s, ms or us)")
    return unit


def _first_ragged_line(path: Path, fields: int) -> str | None:
    """`line N` of the first line without `fields` fields (the parallel parser that found it does not know
    where it was)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip("\r\n") and line.rstrip("\r\n").count("\t") + 1 != fields:
                return f"line {number}"
    return None


# ---------------------------------------------------------------- MovieLens CSV


def read_movielens_csv(folder: Path, timestamp_unit: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    movies_file, ratings_file, tags_file = folder / "movies.csv", folder / "ratings.csv", folder / "tags.csv"
    for f in (movies_file, ratings_file):
        if not f.is_file():
            raise DataError(f"dataset.source: {f} not found (a MovieLens CSV folder has movies.csv and ratings.csv)")
    movies = _read_csv(movies_file, ["movieId", "title", "genres"])
    items = pd.DataFrame(
        {
            ITEM_ID: movies["movieId"],
            "title": movies["title"],
            "genres": movies["genres"].str.replace("|", ", ", regex=False).replace("(no genres listed)", ""),
        }
    )
    if tags_file.is_file():
        tags = _read_csv(tags_file, ["movieId", "tag"])
        # Each movie's distinct tags, in order of first use, folded into one attribute.
        folded = tags.groupby("movieId", sort=False)["tag"].agg(lambda t: ", ".join(dict.fromkeys(t.str.strip())))
        items["tags"] = items[ITEM_ID].map(folded).fillna("")
    ratings = _read_csv(ratings_file, ["userId", "movieId", "timestamp"])
    inter = pd.DataFrame({USER_ID: ratings["userId"], ITEM_ID: ratings["movieId"]})
    inter[TIMESTAMP] = _int_timestamps(ratings["timestamp"], ratings_file, 2, timestamp_unit)
    return items, inter


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (at byte {e.start}); re-encode the file as UTF-8") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing required column {missing[0]!r} (columns: {list(df.columns)})")
    return df


# ---------------------------------------------------------------- Amazon reviews + metadata (2014 and 2018)


def read_amazon(reviews_file: Path, meta_file: Path, timestamp_unit: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for line_no, rec in _json_lines(reviews_file):
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if k not in rec]
        if missing:
            raise DataError(f"{reviews_file}: line {line_no}: missing field {missing[0]!r}")
        rows.append((rec["reviewerID"], rec["asin"], rec["unixReviewTime"]))
    inter = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TIMESTAMP]).astype({USER_ID: str, ITEM_ID: str})
    inter[TIMESTAMP] = _int_timestamps(inter[TIMESTAMP].astype(str), reviews_file, 1, timestamp_unit)

    items = []
    for line_no, rec in _json_lines(meta_file):
        if "asin" not in rec:
            raise DataError(f"{meta_file}: line {line_no}: missing field 'asin'")
        items.append(
            {
                ITEM_ID: str(rec["asin"]),
                "title": _text(rec.get("title")),
                "brand": _text(rec.get("brand")),
                "categories": _categories(rec),
                "price": _text(rec.get("price")),
                "description": _text(rec.get("description")),
            }
        )
    return pd.DataFrame(items, columns=[ITEM_ID, "title", "brand", "categories", "price", "description"]), inter


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Records of a JSON-lines file, plain or gzipped. The 2014 metadata is Python literals, not JSON."""
    if not path.is_file():
        raise DataError(f"dataset: {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        rec = ast.literal_eval(line)
                    except (ValueError, SyntaxError) as e:
                        raise DataError(f"{path}: line {line_no}: not a JSON or Python-literal record ({e})") from e
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: line {line_no}: a record must be an object")
                yield line_no, rec
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (after line {line_no}); re-encode the file as UTF-8") from None


def _categories(rec: dict) -> str:
    cats = rec.get("categories", rec.get("category"))
    if not cats:
        return ""
    flat = []
    for c in cats:
        flat.extend(c if isinstance(c, list) else [c])
    return ", ".join(dict.fromkeys(str(c).strip() for c in flat if str(c).strip()))


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value if str(v).strip())
    return str(value).strip()
