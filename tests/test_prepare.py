"""Dataset import: real datasets, the Amazon formats, preprocessing, bad input, local and S3 roots."""
import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.catalog import attribute_columns
from llmemb_dist.data.importers import RawDataset, RawTable
from llmemb_dist.data.preprocess import preprocess
from llmemb_dist.layout import dataset_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.storage import DataError

from conftest import real_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def _cfg(root, **dataset):
    return load_config(None, [f"root={root}"] + [f"dataset.{k}={v}" for k, v in dataset.items()])


def _counts(uri):
    return storage.read_manifest(uri)["counts"]


@pytest.mark.parametrize(
    "dataset, expected",
    [
        (dict(name="ml-100k", format="recbole", source="recbole:ml-100k"), (943, 1682, 100000)),
        (dict(name="amazon-toys", format="recbole"), (19124, 11758, 165247)),
        (dict(name="ml-latest-small", format="movielens_csv"), (671, 9125, 100004)),
    ],
)
def test_real_datasets_keep_their_published_sizes(tmp_path, dataset, expected):
    if "source" not in dataset:  # not shipped: found where llmemb_dist/data/real.py looks
        dataset = {**dataset, "source": str(real_dataset(dataset["name"]))}
    uri = prepare(_cfg(tmp_path, **dataset))
    c = _counts(uri)
    assert (c["users"], c["items"], c["interactions"]) == expected
    inter = storage.read_table(uri, "interactions")
    catalog = storage.read_table(uri, "catalog")
    assert inter.num_rows == expected[2] and catalog.num_rows == expected[1]
    assert str(inter.schema.field("timestamp").type) == "int64"
    assert catalog.column_names[0] == "item_id" and catalog.column_names[-1] == "text_hash"


def test_movielens_tags_fold_into_an_attribute(tmp_path):
    uri = prepare(_cfg(tmp_path, name="mls", format="movielens_csv", source=str(real_dataset("ml-latest-small"))))
    catalog = storage.read_table(uri, "catalog").to_pandas().set_index("item_id")
    assert attribute_columns(list(catalog.reset_index().columns)) == ["title", "genres", "tags"]
    assert catalog.loc["1", "genres"] == "Adventure, Animation, Children, Comedy, Fantasy"
    assert catalog["tags"].fillna("").str.len().gt(0).sum() > 100


@pytest.mark.parametrize("release, reviews, meta", [
    ("2014", "amazon2014/reviews_Beauty_5.json", "amazon2014/meta_Beauty.json"),
    ("2018", "amazon2018/Fashion_5.json", "amazon2018/meta_AMAZON_FASHION.json"),
])
@pytest.mark.parametrize("gzipped", [False, True])
def test_amazon_json_lines(tmp_path, release, reviews, meta, gzipped):
    src_reviews, src_meta = FIXTURES / reviews, FIXTURES / meta
    if gzipped:
        for src in (src_reviews, src_meta):
            with open(src, "rb") as f, gzip.open(tmp_path / (src.name + ".gz"), "wb") as g:
                shutil.copyfileobj(f, g)
        src_reviews, src_meta = tmp_path / (src_reviews.name + ".gz"), tmp_path / (src_meta.name + ".gz")
    uri = prepare(_cfg(tmp_path / "runs", name=f"amz{release}", format="amazon", source=str(src_reviews), metadata=str(src_meta)))
    c = _counts(uri)
    assert (c["users"], c["interactions"]) == (6, 24)
    catalog = storage.read_table(uri, "catalog").to_pandas().set_index("item_id")
    if release == "2014":
        assert c["items"] == 6  # the never-reviewed item stays in the catalog with filtering off
        assert catalog.loc["B002", "categories"] == "Beauty, Hair Care, Bath"
        assert catalog.loc["B003", "description"] == "Long lasting 'matte' colour."
    else:
        assert catalog.loc["B001", "categories"] == "Clothing, Women, Tops"
        assert catalog.loc["B001", "description"] == "Soft cotton B001. Machine wash."


def test_preprocessing_filters_and_is_deterministic(tmp_path):
    opts = dict(name="f", k_core=5, min_seq_len=6, max_seq_len=50, max_attr_chars=8, max_items=600)
    a = prepare(_cfg(tmp_path / "a", **opts))
    b = prepare(_cfg(tmp_path / "b", **opts))
    inter = storage.read_table(a, "interactions")
    assert inter.equals(storage.read_table(b, "interactions"))
    assert storage.read_table(a, "catalog").equals(storage.read_table(b, "catalog"))
    df = inter.to_pandas()
    per_user = df.groupby("user_id").size()
    assert per_user.min() >= 5 and per_user.max() <= 50
    assert df["item_id"].nunique() <= 600
    catalog = storage.read_table(a, "catalog").to_pandas()
    assert catalog["movie_title"].str.len().max() <= 8
    assert set(catalog["item_id"]) == set(df["item_id"])
    ordered = df.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing)
    assert ordered.all()


def _raw(items: pd.DataFrame, inter: pd.DataFrame, rows_per_batch: int) -> RawDataset:
    """A raw dataset served in batches of `rows_per_batch` rows, as a streamed file is."""
    def table(frame, name):
        arrow = pa.table({c: pa.array(frame[c].astype(str), pa.string()) for c in frame.columns})
        return RawTable(Path(name), list(frame.columns), 2, lambda cols: iter(arrow.select(cols).to_batches(rows_per_batch)))
    return RawDataset(table(items, "x.item"), table(inter, "x.inter"))


def _paper_preprocessing(items: pd.DataFrame, inter: pd.DataFrame, cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The preprocessing as the paper's code does it, in memory: the streamed import must give these rows."""
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable")
    if cfg.max_items:
        counts = inter["item_id"].value_counts()
        inter = inter[inter["item_id"].isin(sorted(counts.index, key=lambda i: (-counts[i], i))[: cfg.max_items])]
    while cfg.k_core:
        keep = (inter.groupby("user_id")["user_id"].transform("size") >= cfg.k_core) & (
            inter.groupby("item_id")["item_id"].transform("size") >= cfg.k_core)
        if keep.all():
            break
        inter = inter[keep]
    if cfg.max_seq_len:
        inter = inter.groupby("user_id", sort=False, group_keys=False).tail(cfg.max_seq_len)
    if cfg.min_seq_len:
        inter = inter[inter.groupby("user_id")["user_id"].transform("size") >= cfg.min_seq_len]
    return items[items["item_id"].isin(set(inter["item_id"]))], inter


@pytest.mark.parametrize("filters", [dict(k_core=3), dict(k_core=2, max_items=40, max_seq_len=6, min_seq_len=4),
                                     dict(max_seq_len=5), dict(min_seq_len=9)])
def test_streamed_import_gives_the_paper_preprocessing_rows_in_order(tmp_path, filters):
    """Many batches and many user buckets give the rows, in the order, of the in-memory preprocessing."""
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(60)], "title": [f"t{k}" for k in range(60)]})
    n = 1500
    inter = pd.DataFrame({"user_id": [f"u{k}" for k in rng.integers(0, 150, n)],
                          "item_id": [f"i{k}" for k in np.minimum(rng.zipf(1.3, n), 60) - 1],
                          "timestamp": rng.integers(1_000_000_000, 1_000_000_050, n)})  # many ties: input order decides
    cfg = load_config(None, ["dataset.name=s"] + [f"dataset.{k}={v}" for k, v in filters.items()]).dataset
    expected_items, expected = _paper_preprocessing(items, inter, cfg)
    prepared = preprocess(_raw(items, inter, 97), cfg, "src", tmp_path, rows_per_bucket=200)
    assert len(prepared.buckets) == 8
    got = pa.concat_tables(prepared.interactions()).to_pandas()
    assert got["user_id"].tolist() == expected["user_id"].tolist()
    assert got["item_id"].tolist() == expected["item_id"].tolist()
    assert got["timestamp"].tolist() == expected["timestamp"].tolist()
    catalog = pa.concat_tables(prepared.catalog()).to_pandas()
    assert catalog["item_id"].tolist() == expected_items["item_id"].tolist()
    assert prepared.counts == {"users": expected["user_id"].nunique(), "items": len(expected_items),
                               "interactions": len(expected)}


def test_k_core_iterates_to_a_fixed_point(tmp_path):
    # u3's only event is on i3; dropping u3 leaves i3 with one user, which must then go too.
    items = pd.DataFrame({"item_id": ["i1", "i2", "i3", "i4"], "title": ["a", "b", "c", "d"]})
    inter = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3", "u1", "u2"],
                          "item_id": ["i1", "i2", "i1", "i2", "i3", "i3", "i4"], "timestamp": range(7)})
    cfg = load_config(None, ["dataset.name=k", "dataset.k_core=2"]).dataset
    out = pa.concat_tables(preprocess(_raw(items, inter, 2), cfg, "src", tmp_path, rows_per_bucket=2).interactions())
    assert sorted(set(out["item_id"].to_pylist())) == ["i1", "i2"] and sorted(set(out["user_id"].to_pylist())) == ["u1", "u2"]


def test_a_bad_timestamp_in_a_later_batch_is_named_by_its_line(tmp_path):
    items = pd.DataFrame({"item_id": ["i1"], "title": ["a"]})
    inter = pd.DataFrame({"user_id": ["u"] * 10, "item_id": ["i1"] * 10, "timestamp": [str(10 + k) for k in range(10)]})
    inter.loc[7, "timestamp"] = "soon"
    with pytest.raises(DataError, match=r"x.inter: line 9: timestamp 'soon' is not a number"):
        preprocess(_raw(items, inter, 3), load_config(None, []).dataset, "src", tmp_path)


def test_s3_import_equals_local(tmp_path, s3_root):
    local = prepare(_cfg(tmp_path, name="ml-100k"))
    remote = prepare(_cfg(s3_root, name="ml-100k"))
    assert remote.startswith("s3://")
    for table in ("catalog", "interactions"):
        assert storage.read_table(remote, table).equals(storage.read_table(local, table))


def test_rerun_is_a_no_op_and_another_config_is_refused(tmp_path):
    cfg = _cfg(tmp_path, name="ml-100k")
    uri = prepare(cfg)
    before = storage.read_manifest(uri)
    assert prepare(cfg) == uri and storage.read_manifest(uri) == before
    with pytest.raises(storage.AlreadyPublished, match="another dataset config"):
        prepare(_cfg(tmp_path, name="ml-100k", k_core=3))


# ---------------------------------------------------------------- bad input: a clear error, nothing published


def _atomic(folder: Path, items: str, inter: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("x.item", items), ("x.inter", inter)):
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


GOOD_ITEMS = "item_id:token\ttitle:token_seq\n1\tA\n2\tB\n"
GOOD_INTER = "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t10\nu\t2\t11\n"


def test_launch_script_reports_errors_cleanly(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / "launch" / "prepare.py"), str(repo / "configs" / "default.yaml"),
                          f"root={tmp_path}", "dataset.k_cor=3"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown config key 'dataset.k_cor'" in out.stderr
    out = subprocess.run([sys.executable, str(repo / "launch" / "prepare.py"), str(repo / "configs" / "default.yaml"),
                          f"root={tmp_path}", "dataset.max_items=50"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert storage.read_manifest(str(tmp_path / "datasets" / "ml-100k"))["counts"]["items"] == 50


def test_raw_files_on_s3_are_imported(tmp_path, s3_root):
    """Production keeps the raw Amazon files in the bucket too (configs/scft_llama7b.yaml)."""
    raw = storage.join(s3_root, "raw")
    for name in ("reviews_Beauty_5.json", "meta_Beauty.json"):
        storage.write_bytes(storage.join(raw, name), (FIXTURES / "amazon2014" / name).read_bytes())
    uri = prepare(_cfg(s3_root, name="amz", format="amazon", source=storage.join(raw, "reviews_Beauty_5.json"),
                       metadata=storage.join(raw, "meta_Beauty.json")))
    assert _counts(uri) == {"users": 6, "items": 6, "interactions": 24}
    with pytest.raises(DataError, match="dataset.source: no such file"):
        prepare(_cfg(s3_root, name="amz2", format="amazon", source=storage.join(raw, "absent.json"),
                     metadata=storage.join(raw, "meta_Beauty.json")))


@pytest.mark.parametrize("unit, raw, stored", [
    ("auto", ["978300760", "978300761"], [978300760, 978300761]),  # seconds, as MovieLens has them
    ("auto", ["1700000000123", "1700000001999"], [1700000000, 1700000001]),  # 13 digits: milliseconds
    ("auto", ["1700000000123456", "1700000000999999"], [1700000000, 1700000000]),  # microseconds
    ("ms", ["5000", "7999"], [5, 7]),  # told, not guessed
])
def test_timestamps_are_stored_in_seconds_whatever_their_unit(tmp_path, unit, raw, stored):
    inter = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"u\t{i + 1}\t{t}\n" for i, t in enumerate(raw))
    cfg = _cfg(tmp_path / "runs", name="t", source=str(_atomic(tmp_path / "src", GOOD_ITEMS, inter)), timestamp_unit=unit)
    prepare(cfg)
    assert storage.read_table(dataset_uri(cfg), "interactions").column("timestamp").to_pylist() == stored


def test_a_file_read_in_many_blocks_gives_the_same_rows_and_line_numbers(tmp_path, monkeypatch):
    from llmemb_dist.data import importers

    items = "item_id:token\ttitle:token_seq\n" + "".join(f"{k}\ttitle {k}\n" for k in range(30))
    rows = [f"u{k % 41}\t{k % 30}\t{1_000_000_000 + k % 17}\n" for k in range(700)]
    src = _atomic(tmp_path / "src", items, "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(rows))
    whole = prepare(_cfg(tmp_path / "whole", name="b", source=str(src), k_core=3))
    monkeypatch.setattr(importers, "BLOCK_BYTES", 64)  # a line or two per block, most lines cut across two
    blocks = prepare(_cfg(tmp_path / "blocks", name="b", source=str(src), k_core=3))
    for table in ("catalog", "interactions"):
        assert storage.read_table(blocks, table).equals(storage.read_table(whole, table))
    rows[400] = "u1\t3\tnoon\n"
    bad = _atomic(tmp_path / "bad", items, "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(rows))
    with pytest.raises(DataError, match=r"x.inter: line 402: timestamp 'noon' is not a number"):
        prepare(_cfg(tmp_path / "bad-run", name="b", source=str(bad)))
