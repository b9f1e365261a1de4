"""Readers for the raw dataset formats; each returns the items and the interactions as `RawTable`s.

items: `item_id` plus one column per attribute. interactions: user_id, item_id, timestamp. Every value is
text (timestamps too: their unit is decided over the whole file, data/timestamps.py), read in batches in
file order, so a file larger than memory goes through. RecBole files are streamed from disk, Parquet tables
(a production catalog's export, with its own column names) from a local folder or S3 as they are; the
MovieLens CSV and Amazon JSON readers fold and parse in memory first (their public releases are small),
then serve batches the same way. Errors name the file and line (or row).
"""
from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from llmemb_dist import storage
from llmemb_dist.config import ParquetColumns
from llmemb_dist.data.catalog import ITEM_ID, TIMESTAMP, USER_ID
from llmemb_dist.storage import DataError

RECBOLE_PREFIX = "recbole:"
BLOCK_BYTES = 8 << 20  # raw text parsed at once: bounds the import's memory; per-batch lookups favour larger


@dataclass(frozen=True)
class RawTable:
    """One raw file as batches of Arrow strings, in file order."""

    path: Path | str
    columns: list[str]
    first_line: int  # the file's line of the first row, for messages
    read: Callable[[list[str]], Iterator[pa.RecordBatch]]
    # A table of several files (Parquet): each file's name and rows, in read order; rows are named in their file.
    files: tuple[tuple[str, int], ...] = ()

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        return self.read(columns or self.columns)

    def position(self, row: int) -> str:
        """Where the table's row `row` (counted from 0 in read order) is, for messages: `line 12`, or
        `row 3 of part-0001.parquet`."""
        if not self.files:
            return f"line {row + self.first_line}"
        for name, rows in self.files:
            if row < rows:
                return f"row {row} of {name}"
            row -= rows
        raise IndexError(row)

    @classmethod
    def in_memory(cls, frame: pd.DataFrame, path: Path, first_line: int) -> RawTable:
        table = pa.table({name: pa.array(frame[name].astype(str), pa.string()) for name in frame.columns})
        return cls(path, list(frame.columns), first_line, lambda columns: iter(table.select(columns).to_batches()))


class RawDataset(NamedTuple):
    items: RawTable
    interactions: RawTable


def read_dataset(fmt: str, source: str, metadata: str = "", parquet: ParquetColumns | None = None) -> RawDataset:
    if fmt == "parquet":
        return read_parquet_tables(source, parquet or ParquetColumns())
    if fmt == "recbole":
        return read_recbole(resolve_recbole_source(source))
    if fmt == "movielens_csv":
        return read_movielens_csv(Path(source))
    if fmt == "amazon":
        if not metadata:
            raise DataError("dataset.metadata: the amazon format needs the metadata JSON lines file")
        return read_amazon(Path(source), Path(metadata))
    raise DataError(f"dataset.format: unknown format {fmt!r}")


def resolve_recbole_source(source: str) -> Path:
    """`recbole:<name>` is an example dataset shipped inside the recbole wheel (found without importing it)."""
    if not source.startswith(RECBOLE_PREFIX):
        return Path(source)
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset.source {source!r} needs the recbole wheel: pip install --no-deps recbole==1.2.1")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / source[len(RECBOLE_PREFIX):]


# ---------------------------------------------------------------- Parquet tables


PARQUET_BATCH_ROWS = 65_536


def read_parquet_tables(source: str, columns: ParquetColumns) -> RawDataset:
    """A catalog and an interactions table as Parquet under `source` (a folder or s3:// prefix), their columns
    renamed to this importer's by `dataset.parquet`."""
    renamed = dict(_attribute_names(columns.attributes))
    items = _parquet_table(storage.join(source, columns.items), {columns.item_id: ITEM_ID, **renamed},
                           others=not renamed, key="items")
    inter = _parquet_table(storage.join(source, columns.interactions),
                           {columns.user_id: USER_ID, columns.interaction_item_id or columns.item_id: ITEM_ID,
                            columns.timestamp: TIMESTAMP}, others=False, key="interactions")
    return RawDataset(items, inter)


def _attribute_names(attributes: list[str]) -> Iterator[tuple[str, str]]:
    for spec in attributes:
        column, _, prompt_name = spec.partition(":")
        if not column:
            raise DataError(f"dataset.parquet.attributes: {spec!r} names no column (`column` or `column:prompt name`)")
        yield column, prompt_name.strip() or column


def _parquet_table(uri: str, names: dict[str, str], others: bool, key: str) -> RawTable:
    """The Parquet file or folder at `uri` as a RawTable of text columns named by `names` (source column ->
    importer column); with `others`, every other column too, under its own name."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    try:
        data = pads.dataset(path, filesystem=fs, format="parquet")
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as e:
        raise DataError(f"dataset.parquet.{key}: {uri} is no Parquet file or folder of them ({e})") from None
    fragments = sorted(data.get_fragments(), key=lambda f: f.path)
    if not fragments:
        raise DataError(f"dataset.parquet.{key}: {uri} holds no Parquet file")
    missing = [c for c in names if c not in data.schema.names]
    if missing:
        raise DataError(f"{uri}: no column {missing[0]!r} (dataset.parquet names it); the columns are {data.schema.names}")
    if others:
        names = {**names, **{c: c for c in data.schema.names if c not in names}}
    files = tuple((Path(f.path).name, f.count_rows()) for f in fragments)
    source_of = {importer: column for column, importer in names.items()}

    def read(wanted: list[str]) -> Iterator[pa.RecordBatch]:
        for fragment in fragments:
            for batch in fragment.to_batches(columns=[source_of[c] for c in wanted], batch_size=PARQUET_BATCH_ROWS):
                yield pa.record_batch([_as_text(batch.column(i), uri, source_of[c]) for i, c in enumerate(wanted)],
                                      names=wanted)

    return RawTable(uri, list(names.values()), 0, read, files)


def _as_text(values: pa.Array, uri: str, column: str) -> pa.Array:
    """A column as the text every importer hands on: times and dates as seconds since 1970 (dataset.timestamp_unit
    then reads them as s), lists of strings joined by ", ", anything else by Arrow's cast."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        return _as_text(values.dictionary_decode(), uri, column)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        seconds = pc.cast(pc.cast(values, pa.timestamp("s"), safe=False), pa.int64())
        return pc.cast(seconds, pa.string())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pc.binary_join(pc.cast(values, pa.list_(pa.string())), ", ")
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{uri}: column {column!r} is of type {kind}, which has no text to read") from None


# ---------------------------------------------------------------- RecBole atomic files


def read_recbole(folder: Path) -> RawDataset:
    items = _atomic_file(_one_file(folder, ".item"), [ITEM_ID])
    inter = _atomic_file(_one_file(folder, ".inter"), [USER_ID, ITEM_ID, TIMESTAMP])
    return RawDataset(items, inter)


def _one_file(folder: Path, suffix: str) -> Path:
    if not folder.is_dir():
        raise DataError(f"dataset.source: {folder} is not a folder")
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise DataError(f"{folder}: expected one *{suffix} file, found {[p.name for p in found]}")
    return found[0]


ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")  # RecBole's field types; every value is read as text


def _atomic_file(path: Path, required: list[str]) -> RawTable:
    """An atomic file: a tab-separated header of `name:type` fields, then the rows."""
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
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: missing required column {missing[0]!r} (columns: {names})")
    return RawTable(path, names, 2, lambda columns: _tab_separated(path, names, columns))


def _tab_separated(path: Path, names: list[str], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The rows after the header, as text, a block of whole lines at a time, each parsed by Arrow's
    multi-threaded parser (no Python object per value). The blocks are cut here rather than by Arrow's
    streaming reader, which reads many blocks ahead of a slower consumer. No quoting: a quote is part of
    the value."""
    with open(path, "rb") as f:
        f.readline()
        rest = b""
        while block := f.read(BLOCK_BYTES):
            block = rest + block
            end = block.rfind(b"\n") + 1
            rest = block[end:]
            if end:
                yield from _parse_block(path, names, columns, block[:end])
        if rest:
            yield from _parse_block(path, names, columns, rest)


def _parse_block(path: Path, names: list[str], columns: list[str], block: bytes) -> Iterator[pa.RecordBatch]:
    ragged = []

    def refuse(row) -> str:
        ragged.append(row)
        return "error"

    try:
        yield from pacsv.read_csv(
            pa.BufferReader(block),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=refuse),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        ).combine_chunks().to_batches()
    except pa.ArrowInvalid as e:
        if ragged:
            where = _first_ragged_line(path, len(names)) or f"the line {ragged[0].text[:80]!r}"
            raise DataError(f"{path}: {where} has {ragged[0].actual_columns} tab-separated fields where the header "
                            f"has {len(names)}") from None
        if "invalid UTF8" in str(e):
            raise DataError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None
        raise DataError(f"{path}: {e}") from None


def _first_ragged_line(path: Path, fields: int) -> str | None:
    """`line N` of the first line without `fields` fields (the parallel parser that found it does not know
    where it was)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip("\r\n") and line.rstrip("\r\n").count("\t") + 1 != fields:
                return f"line {number}"
    return None


# ---------------------------------------------------------------- MovieLens CSV


def read_movielens_csv(folder: Path) -> RawDataset:
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
    inter = pd.DataFrame({USER_ID: ratings["userId"], ITEM_ID: ratings["movieId"], TIMESTAMP: ratings["timestamp"]})
    return RawDataset(RawTable.in_memory(items, movies_file, 2), RawTable.in_memory(inter, ratings_file, 2))


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


def read_amazon(reviews_file: Path, meta_file: Path) -> RawDataset:
    rows = []
    for line_no, rec in _json_lines(reviews_file):
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if k not in rec]
        if missing:
            raise DataError(f"{reviews_file}: line {line_no}: missing field {missing[0]!r}")
        rows.append((rec["reviewerID"], rec["asin"], rec["unixReviewTime"]))
    inter = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TIMESTAMP])

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
    items = pd.DataFrame(items, columns=[ITEM_ID, "title", "brand", "categories", "price", "description"])
    return RawDataset(RawTable.in_memory(items, meta_file, 1), RawTable.in_memory(inter, reviews_file, 1))


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
