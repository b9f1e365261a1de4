"""Bad input, in one place, as a user meets it: each case runs a stage through its command-line entry
point and must end with exit code 2 and an `error:` line that names the file, row or key, no traceback,
and nothing published. Stage-level refusals that need a Ray cluster (embeddings of another model,
an empty version, a planted checkpoint) are tested with their stages: test_embed, test_adapt,
test_checkpoints, test_scft."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmemb_dist import storage
from llmemb_dist.cli import main
from llmemb_dist.stages.prepare.driver import prepare
from llmemb_dist.stages.rat.driver import rat

from conftest import REPO

CONFIG = str(REPO / "configs" / "default.yaml")

GOOD_ITEMS = "item_id:token\ttitle:token_seq\n1\tA\n2\tB\n"
GOOD_INTER = "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t10\nu\t2\t11\n"


def published(root: Path) -> list[Path]:
    return sorted(root.rglob(storage.MANIFEST)) if root.exists() else []


def refused(capsys, code: int, message: str) -> None:
    """Exit code 2, the last line `error: ...` matching `message`, and no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last


def atomic(folder: Path, items: str | bytes, inter: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("x.item", items), ("x.inter", inter)):
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


CONFIG_CASES = [("scft.steps=0", "'scft.steps' must be at least 1, got 0"),
     ("dataset.max_seq_len=-1", "'dataset.max_seq_len' must be at least 0, got -1"),
     ("dataset.max_attr_chars=-3", "'dataset.max_attr_chars' must be at least 0, got -3"),
     ("dataset.num_shards=0", "'dataset.num_shards' must be at least 1, got 0"),
     ("dataset.timestamp_unit=ns", "'dataset.timestamp_unit' must be one of ['auto', 's', 'ms', 'us'], got 'ns'"),
     ("scft.zero_stage=4", "'scft.zero_stage' must be one of [0, 1, 2, 3], got 4"),
     ("scft.zero_stage=true", "'scft.zero_stage' must be one of [0, 1, 2, 3], got True"),
     ("scft.batch_size=1", "'scft.batch_size' must be at least 2, got 1"),
     ("scft.lr=0", "'scft.lr' must be greater than 0, got 0.0"),
     ("rat.dropout=1", "'rat.dropout' must be in [0, 1), got 1.0"),
     ("rat.eval.head_fraction=0", "'rat.eval.head_fraction' must be in (0, 1), got 0.0"),
     ("dataset.max_items=-5", "'dataset.max_items' must be at least 0, got -5"),
     ("rat.epochs=0", "'rat.epochs' must be at least 1, got 0"),
     ("scft.temperature_init=2", "scft.temperature_init 2.0 must lie in [scft.temperature_min 0.01"),
     ("rat.eval.ks=[0, 10]", "rat.eval.ks must be a non-empty list of cut-offs of at least 1")] + [
    ("dataset.name=../../../escaped", "'dataset.name' must be a name"),
    ("scft.run=a/b", "'scft.run' must be a name"),
    ("embed.version=.hidden", "'embed.version' must be a name"),
    ("rat.run=bad\nname", "'rat.run' must be a name"),
    ("adapt.version=..", "'adapt.version' must be a name"),
    ("adapt.incremental_from=x/../../y", "'adapt.incremental_from' must be a name"),
    ("root=s3://", "names no S3 bucket"),
    ("root=s3:///prefix", "names no S3 bucket"),
    ("rat.embeddings=s3://bucket/a/../b", "'..' segment"),
    ("root=ftp://host/x", "unknown URI scheme"),
]


@pytest.mark.parametrize("override, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_values_are_refused_by_key_before_anything_runs(tmp_path, capsys, override, message):
    root = tmp_path / "runs"
    refused(capsys, main("prepare", prepare, [CONFIG, f"root={root}", override]), re.escape(message))
    assert published(tmp_path) == [] and not root.exists()


IMPORT_CASES = [
    ("item_id:token\ttitle:text\n1\tA\n", GOOD_INTER, r"x.item: header field 1 \('title:text'\) has type 'text'"),
        ("id:token\ttitle:token_seq\n1\tA\n", GOOD_INTER, r"x.item.*missing required column 'item_id'"),
        ("item_id:token\ttitle:token_seq\n1\tA\n1\tB\n", GOOD_INTER, r"duplicate item_id '1' at row 1"),
        ("item_id:token\ttitle:token_seq\n1\tA\n\n2\tB\tC\n", GOOD_INTER,
         r"x.item: line 4 has 3 tab-separated fields where the header has 2"),
        ("item_id:token\ttitle:token_seq\n", GOOD_INTER, r"catalog is empty"),
        ("item_id:token\n1\n2\n", GOOD_INTER, r"no attribute columns"),
        (GOOD_ITEMS, "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t10\nu\t9\t11\n", r"row 1 names item '9'"),
        (GOOD_ITEMS, "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t10\nu\t2\tyesterday\n", r"x.inter: line 3: timestamp 'yesterday'"),
        (GOOD_ITEMS, "user_id:token\titem_id:token\nu\t1\n", r"x.inter: missing required column 'timestamp'"),
        ("item_id:token\ttitle:token_seq\tgenre:token\n1\tA\t\n2\t \t\n", GOOD_INTER,
         r"src \(items\): row 1 \(item '2'\) has every attribute \(title, genre\) empty"),
        ("item_id:token\ttitle:token_seq\n1\tA\n2\t\xe9t\xe9\n".encode("latin-1"), GOOD_INTER, r"x.item: not UTF-8 text"),
        ("\ufeffitem_id:token\ttitle:token_seq\n1\tA\n2\tB\n".encode(), "\ufeff" + GOOD_INTER, None),  # a BOM is fine
        (GOOD_ITEMS, "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t1700000000000\nu\t2\t10\n",
         r"x.inter: timestamps mix units: line 2 has '1700000000000' \(in ms\) and line 3 '10'"),
        (GOOD_ITEMS, "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t10\nu\t2\tinf\n", r"line 3: timestamp 'inf' is not a number"),
        (GOOD_ITEMS, "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t10\nu\t2\t99999999999999999999\n",
         r"line 3: timestamp '99999999999999999999' is past 2100 even in microseconds"),
        (GOOD_ITEMS, "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t-5\nu\t2\t10\n",
         r"line 2: timestamp '-5' is no time between 1970 and 2100 in s"),
]


@pytest.mark.parametrize("items, inter, message", IMPORT_CASES)
def test_import_names_the_file_and_row_and_publishes_nothing(tmp_path, capsys, items, inter, message):
    source = atomic(tmp_path / "src", items, inter)
    code = main("prepare", prepare, [CONFIG, f"root={tmp_path / 'runs'}", "dataset.name=bad", "dataset.format=recbole",
                                      f"dataset.source={source}"])
    if message is None:
        assert code == 0 and len(published(tmp_path)) == 1
        return
    refused(capsys, code, message)
    assert published(tmp_path) == []


def test_filters_that_leave_nothing(tmp_path, capsys):
    source = atomic(tmp_path / "src", GOOD_ITEMS, GOOD_INTER)
    code = main("prepare", prepare, [CONFIG, f"root={tmp_path / 'runs'}", "dataset.format=recbole", f"dataset.source={source}",
                                      "dataset.k_core=3"])
    refused(capsys, code, "leaves no interactions")
    assert published(tmp_path) == []


def test_more_sampled_negatives_than_the_catalog_has(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main("prepare", prepare, [CONFIG, f"root={root}", "dataset.max_items=50"]) == 0
    before = published(tmp_path)
    code = main("rat", rat, [CONFIG, f"root={root}", "dataset.max_items=50", "rat.item_repr=id", "rat.eval.num_negatives=100"])
    refused(capsys, code, r"rat.eval.num_negatives=100, but the catalog has 50 items")
    assert published(tmp_path) == before  # refused before Ray starts: only the dataset


def test_a_root_the_os_refuses_and_ctrl_c_end_with_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    refused(capsys, main("prepare", prepare, [CONFIG, f"root={blocker}/runs", "dataset.max_items=50"]), "a-file")

    def interrupted(cfg):
        raise KeyboardInterrupt

    assert main("embed", interrupted, [CONFIG, f"root={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("interrupted: what embed had published is kept") and "Traceback" not in err


def test_a_missing_config_file_is_an_error_with_usage(tmp_path, capsys):
    refused(capsys, main("pipeline", prepare, [f"root={tmp_path}"]), r"a config file is needed first: llmemb pipeline <config.yaml>")
    assert published(tmp_path) == []
