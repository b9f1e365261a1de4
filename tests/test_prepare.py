"""Dataset import: real datasets, the Amazon formats, preprocessing, bad input, local and S3 roots."""
import gzip
import shutil
from pathlib import Path

import pandas as pd
import pytest

from llmemb_dist import storage
from llmemb_dist.config import load_config
from llmemb_dist.data.catalog import attribute_columns
from llmemb_dist.layout import dataset_uri
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.storage import DataError

from conftest import SHARED_DATA

FIXTURES = Path(__file__).parent / "fixtures"


def _cfg(root, **dataset):
    return load_config(None, [f"root={root}"] + [f"dataset.{k}={v}" for k, v in dataset.items()])


def _counts(uri):
    return storage.read_manifest(uri)["counts"]


@pytest.mark.parametrize(
    "dataset, expected",
    [
        (dict(name="ml-100k", format="recbole", source="recbole:ml-100k"), (943, 1682, 100000)),
        (dict(name="amazon-toys", format="recbole", source=str(SHARED_DATA / "amazon-toys")), (19124, 11758, 165247)),
        (dict(name="ml-latest-small", format="movielens_csv", source=str(SHARED_DATA / "ml-latest-small")), (671, 9125, 100004)),
    ],
)
def test_real_datasets_keep_their_published_sizes(tmp_path, dataset, expected):
    uri = prepare(_cfg(tmp_path, **dataset))
    c = _counts(uri)
    assert (c["users"], c["items"], c["interactions"]) == expected
    inter = storage.read_table(uri, "interactions")
    catalog = storage.read_table(uri, "catalog")
    assert inter.num_rows == expected[2] and catalog.num_rows == expected[1]
    assert str(inter.schema.field("timestamp").type) == "int64"
    assert catalog.column_names[0] == "item_id" and catalog.column_names[-1] == "text_hash"


def test_movielens_tags_fold_into_an_attribute(tmp_path):
    uri = prepare(_cfg(tmp_path, name="mls", format="movielens_csv", source=str(SHARED_DATA / "ml-latest-small")))
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


def test_k_core_iterates_to_a_fixed_point():
    from llmemb_dist.data.preprocess import k_core

    # u3's only event is on i3; dropping u3 leaves i3 with one user, which must then go too.
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3", "u1", "u2"],
                       "item_id": ["i1", "i2", "i1", "i2", "i3", "i3", "i4"], "timestamp": range(7)})
    out = k_core(df, 2)
    assert sorted(set(out["item_id"])) == ["i1", "i2"] and sorted(set(out["user_id"])) == ["u1", "u2"]


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
