"""dataset.format=parquet: a production catalog's Parquet export, with its own column names, imported in place
(local folder or S3) into the same publication the RecBole import makes, with the same checks."""
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.importers import read_recbole, resolve_recbole_source
from llmemb_dist.layout import dataset_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.storage import DataError

COLUMNS = ["dataset.parquet.item_id=sku", "dataset.parquet.user_id=customer", "dataset.parquet.interaction_item_id=product",
           "dataset.parquet.timestamp=at", "dataset.parquet.attributes=[title:movie_title,year:release_year,genre:class]"]


def ml100k_tables() -> tuple[pa.Table, pa.Table]:
    """MovieLens-100K from the recbole wheel, as the importer reads it (text columns)."""
    raw = read_recbole(resolve_recbole_source("recbole:ml-100k"))
    items = pa.Table.from_batches(list(raw.items.batches()))
    inter = pa.Table.from_batches(list(raw.interactions.batches()))
    return items, inter


def export(folder, items: pa.Table, inter: pa.Table, parts: int = 3) -> None:
    """The tables as a warehouse would export them: other column names, typed times, several files."""
    (folder / "items").mkdir(parents=True)
    (folder / "interactions").mkdir(parents=True)
    catalog = pa.table({"sku": items["item_id"], "title": items["movie_title"], "year": items["release_year"],
                        "genre": items["class"], "internal_note": pa.array(["x"] * items.num_rows)})
    pq.write_table(catalog, folder / "items" / "part-0.parquet")
    seconds = pc.cast(pc.cast(inter["timestamp"], pa.float64()), pa.int64())
    events = pa.table({"customer": inter["user_id"], "product": inter["item_id"],
                       "at": pc.cast(seconds, pa.timestamp("s"))})
    step = -(-events.num_rows // parts)
    for k in range(parts):
        pq.write_table(events.slice(k * step, step), folder / "interactions" / f"part-{k}.parquet")


def test_parquet_export_gives_the_publication_of_the_recbole_files(tmp_path):
    items, inter = ml100k_tables()
    export(tmp_path / "export", items, inter)
    root = tmp_path / "runs"
    atomic = prepare(load_config(None, [f"root={root}", "dataset.name=atomic"]))
    parquet = prepare(load_config(None, [f"root={root}", "dataset.name=exported", "dataset.format=parquet",
                                         f"dataset.source={tmp_path / 'export'}", *COLUMNS]))
    assert storage.read_manifest(parquet)["counts"] == storage.read_manifest(atomic)["counts"]
    for table in ("catalog", "interactions"):
        assert storage.read_table(parquet, table).equals(storage.read_table(atomic, table)), table


def test_parquet_on_s3_is_read_in_place(tmp_path, s3_root):
    items, inter = ml100k_tables()
    export(tmp_path / "export", items.slice(0, 400), inter.filter(pc.less_equal(pc.cast(inter["item_id"], pa.int64()), 400)))
    storage.upload_dir(tmp_path / "export", storage.join(s3_root, "export"))
    local = prepare(load_config(None, [f"root={tmp_path / 'runs'}", "dataset.format=parquet",
                                       f"dataset.source={tmp_path / 'export'}", *COLUMNS]))
    remote = prepare(load_config(None, [f"root={s3_root}", "dataset.format=parquet",
                                        f"dataset.source={storage.join(s3_root, 'export')}", *COLUMNS]))
    for table in ("catalog", "interactions"):
        assert storage.read_table(remote, table).equals(storage.read_table(local, table))


def bad_export(tmp_path, change):
    items = pa.table({"sku": ["a", "b", "c"], "title": ["A", "B", "C"]})
    events = pa.table({"customer": ["u"] * 3 + ["v"] * 3, "product": ["a", "b", "c"] * 2,
                       "at": pa.array(["1700000000", "1700000100", "1700000200"] * 2)})
    items, events = change(items, events)
    (tmp_path / "items").mkdir()
    (tmp_path / "interactions").mkdir()
    pq.write_table(items, tmp_path / "items" / "part-0.parquet")
    pq.write_table(events.slice(0, 2), tmp_path / "interactions" / "part-0.parquet")
    pq.write_table(events.slice(2), tmp_path / "interactions" / "part-1.parquet")
    return load_config(None, [f"root={tmp_path / 'runs'}", "dataset.format=parquet", f"dataset.source={tmp_path}",
                              "dataset.parquet.item_id=sku", "dataset.parquet.user_id=customer",
                              "dataset.parquet.interaction_item_id=product", "dataset.parquet.timestamp=at"])


def with_value(table, column, row, value):
    values = table[column].to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, table[column].type))


@pytest.mark.parametrize("change, message", [
    (lambda i, e: (i, with_value(e, "at", 3, "soon")), r"interactions: row 1 of part-1.parquet: timestamp 'soon' is not a number"),
    (lambda i, e: (with_value(i, "sku", 2, "a"), e), r"duplicate item_id 'a' at row 2"),
    (lambda i, e: (with_value(i, "sku", 1, ""), e), r"row 1 has an empty 'item_id'"),
    (lambda i, e: (with_value(i, "title", 1, ""), e), r"row 1 \(item 'b'\) has every attribute \(title\) empty"),
    (lambda i, e: (i.drop_columns(["title"]), e), r"no attribute columns besides 'item_id'"),
    (lambda i, e: (i, e.drop_columns(["at"])), r"interactions: no column 'at' \(dataset.parquet names it\)"),
])
def test_bad_parquet_input_is_one_error_naming_the_file_and_row_and_publishes_nothing(tmp_path, change, message):
    cfg = bad_export(tmp_path, change)
    with pytest.raises(DataError, match=message):
        prepare(cfg)
    assert not storage.is_published(dataset_uri(cfg))


def test_a_source_without_parquet_files_is_a_clear_error(tmp_path):
    (tmp_path / "items").mkdir()
    cfg = load_config(None, [f"root={tmp_path / 'runs'}", "dataset.format=parquet", f"dataset.source={tmp_path}"])
    with pytest.raises(DataError, match=r"dataset.parquet.items: .*items holds no Parquet file"):
        prepare(cfg)
