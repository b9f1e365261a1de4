import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from llmemb_dist import storage
from llmemb_dist.storage import AlreadyPublished, DataError, NotPublished, StorageError

from conftest import free_port


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "runs") if request.param == "local" else request.getfixturevalue("s3_root")


def _table(n=10):
    return pa.table({"item_id": [str(i) for i in range(n)], "title": [f"t{i}" for i in range(n)]})


def _publish(uri, table, overwrite=False, fail=False):
    with storage.publish(uri, kind="test", config={"a": 1}, config_hash="h", overwrite=overwrite) as pub:
        pub.write_table("items", table, num_shards=3)
        if fail:
            raise RuntimeError("crash before the manifest")


def test_publish_and_read_back(root):
    uri = storage.join(root, "things", "v1")
    _publish(uri, _table())
    manifest = storage.read_manifest(uri)
    assert manifest["tables"]["items"]["rows"] == 10 and len(manifest["tables"]["items"]["files"]) == 3
    assert storage.read_table(uri, "items").equals(_table())
    assert b"a: 1" in storage.read_bytes(storage.join(storage.data_uri(uri), "config.yaml"))


def test_a_stream_of_batches_is_sharded_as_the_whole_table_is(root):
    """Batches cut across shard boundaries land in the same contiguous shards as the table written at once."""
    table = _table(23)
    whole, streamed = storage.join(root, "whole"), storage.join(root, "streamed")
    _publish(whole, table)
    with storage.publish(streamed, kind="test", config={"a": 1}, config_hash="h") as pub:
        pub.write_batches("items", table.to_batches(max_chunksize=4), table.num_rows, num_shards=3)
    for uri in (whole, streamed):
        files = storage.read_manifest(uri)["tables"]["items"]["files"]
        assert [storage.read_parquet_files([storage.join(storage.data_uri(uri), "items", f)]).num_rows for f in files] == [7, 8, 8]
    assert storage.read_table(streamed, "items").equals(table)
    with pytest.raises(ValueError, match="23 rows written where 24 were announced"), \
            storage.publish(storage.join(root, "short"), kind="test", config={}, config_hash="h") as pub:
        pub.write_batches("items", table.to_batches(max_chunksize=4), 24, num_shards=3)
    assert not storage.is_published(storage.join(root, "short"))


def test_reader_refuses_folder_without_manifest(root):
    uri = storage.join(root, "crashed")
    with pytest.raises(RuntimeError):
        _publish(uri, _table(), fail=True)
    with pytest.raises(NotPublished, match="not published"):
        storage.read_table(uri, "items")


def test_failed_overwrite_leaves_earlier_version(root):
    uri = storage.join(root, "v")
    _publish(uri, _table(4))
    with pytest.raises(RuntimeError):
        _publish(uri, _table(8), overwrite=True, fail=True)
    assert storage.read_table(uri, "items").num_rows == 4
    _publish(uri, _table(8), overwrite=True)
    assert storage.read_table(uri, "items").num_rows == 8
    assert len([d for d in storage.list_dirs(uri) if d.startswith("data-")]) >= 1


def test_publish_or_skip_guard(tmp_path):
    uri = str(tmp_path / "out")
    assert not storage.already_published(uri, {"config_hash": "h"}, "thing")  # nothing there: do the work
    _publish(uri, _table())
    assert storage.already_published(uri, {"config_hash": "h"}, "thing")  # same identity: nothing to do
    with pytest.raises(AlreadyPublished, match="is published from another config or other inputs; pick another"):
        storage.already_published(uri, {"config_hash": "other"}, "thing", hint="pick another")
    assert not storage.already_published(uri, {"config_hash": "other"}, "thing", replace=True)
    assert storage.read_table(uri, "items").equals(_table())  # the guard never touches what is published


def test_second_publisher_is_refused_and_first_stays(root):
    uri = storage.join(root, "race")
    # Two jobs that both saw "not published" and both reach the commit: only one may win.
    first = storage.publish(uri, kind="test", config={}, config_hash="1")
    second = storage.publish(uri, kind="test", config={}, config_hash="2")
    pub1, pub2 = first.__enter__(), second.__enter__()
    pub1.write_table("items", _table(3))
    pub2.write_table("items", _table(5))
    first.__exit__(None, None, None)
    with pytest.raises(AlreadyPublished):
        second.__exit__(None, None, None)
    assert storage.read_manifest(uri)["config_hash"] == "1"
    assert storage.read_table(uri, "items").num_rows == 3
    assert storage.read_latest(uri) == storage.read_manifest(uri)["data_dir"]  # the loser never moves the pointer
    with pytest.raises(AlreadyPublished):
        _publish(uri, _table())


def test_corrupt_and_truncated_parquet_name_the_file(tmp_path):
    uri = str(tmp_path / "p")
    _publish(uri, _table(50))
    files = storage.table_files(uri, "items")
    path = storage.resolve(files[0])[1]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match="part-00000.parquet"):
        storage.read_table(uri, "items")
    open(path, "wb").write(b"not parquet at all")
    with pytest.raises(DataError, match="part-00000.parquet"):
        storage.read_table(uri, "items")


def test_unknown_scheme():
    with pytest.raises(StorageError, match="unknown URI scheme"):
        storage.resolve("gs://bucket/x")


def test_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    start = time.monotonic()
    with pytest.raises(StorageError, match="s3://bucket/x"):
        storage.is_published("s3://bucket/x")
    assert time.monotonic() - start < 30


@pytest.fixture
def authenticating_s3(monkeypatch):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    yield
    proc.terminate()
    proc.wait(timeout=10)


def test_wrong_credentials_are_a_clear_error(authenticating_s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="s3://bucket/runs"):
        _publish("s3://bucket/runs", _table())


def test_cleanup_removes_only_old_unreferenced_transactions(root):
    from llmemb_dist.cleanup import cleanup
    from llmemb_dist.config import load_config

    kept = storage.join(root, "embeddings", "v1")
    _publish(kept, _table(4))
    old_crash = storage.join(kept, "data-20200101T000000-deadbeef")  # a crashed overwrite, long ago
    storage.write_bytes(storage.join(old_crash, "items", "part-00000.parquet"), b"half")
    never = storage.join(root, "rat", "r", "result")  # a publication that never committed
    with pytest.raises(RuntimeError):
        _publish(never, _table(), fail=True)
    storage.write_bytes(storage.join(never, "data-20210101T000000-0123abcd", "x"), b"old")
    race = storage.join(root, "race")  # the loser of a race, just now
    winner, loser = (storage.publish(race, kind="t", config={}, config_hash=h) for h in "12")
    winner.__enter__().write_table("items", _table(2))
    loser.__enter__().write_table("items", _table(3))
    winner.__exit__(None, None, None)
    with pytest.raises(AlreadyPublished):
        loser.__exit__(None, None, None)

    old = storage.unreferenced_transactions(root, dt.timedelta(hours=24))
    assert [u.rsplit("/", 2)[-2:] for u in old] == [["v1", "data-20200101T000000-deadbeef"],
                                                   ["result", "data-20210101T000000-0123abcd"]]
    assert len(storage.unreferenced_transactions(root, dt.timedelta(0))) == 4  # + the loser and the crash just now

    listed = cleanup(load_config(None, [f"root={root}"]))  # lists, removes nothing
    assert listed == old
    assert storage.unreferenced_transactions(root, dt.timedelta(hours=24)) == old
    assert cleanup(load_config(None, [f"root={root}", "cleanup.remove=true"])) == old
    assert storage.unreferenced_transactions(root, dt.timedelta(hours=24)) == []
    assert storage.read_table(kept, "items").num_rows == 4 and storage.read_table(race, "items").num_rows == 2


def _stable_files(uri: str, name: str) -> list[str]:
    """The plain files a manifest-less reader (pandas, DuckDB, Spark) finds at `<uri>/<name>`."""
    fs, path = storage.resolve(storage.join(uri, name))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def test_a_publication_is_readable_at_stable_paths_without_its_manifest(root):
    uri = storage.join(root, "pub")
    with storage.publish(uri, kind="test", config={"a": 1}, config_hash="h") as pub:
        pub.write_table("items", _table(10), num_shards=3)
        pub.write_text("notes/readme.txt", "v1")
    fs, path = storage.resolve(uri)
    assert [f for f in _stable_files(uri, "items") if not f.startswith("_")] == sorted(
        storage.read_manifest(uri)["tables"]["items"]["files"])
    stable = pq.read_table(f"{path}/items", filesystem=fs)  # what pandas and Spark do with a folder
    assert stable.sort_by("item_id").equals(storage.read_table(uri, "items").sort_by("item_id"))
    assert storage.read_bytes(storage.join(uri, "notes", "readme.txt")) == b"v1"
    if storage.is_s3(root):  # copies, complete once the folder's _SUCCESS exists
        assert "_SUCCESS" in _stable_files(uri, "items")

    # Replaced in place: the stable paths show only the new version; a name it lacks is gone.
    with storage.publish(uri, kind="test", config={"a": 2}, config_hash="h2", overwrite=True) as pub:
        pub.write_table("items", _table(4), num_shards=1)
    assert pq.read_table(f"{path}/items", filesystem=fs).num_rows == 4
    assert [f for f in _stable_files(uri, "items") if not f.startswith("_")] == ["part-00000.parquet"]
    assert not storage.exists(storage.join(uri, "notes", "readme.txt"))


def test_a_failed_publication_shows_nothing_at_stable_paths(root):
    uri = storage.join(root, "pub")
    with pytest.raises(RuntimeError):
        _publish(uri, _table(), fail=True)
    assert not storage.exists(storage.join(uri, "items"))


def _latest_items(uri: str) -> pa.Table:
    """What a manifest-less reader that resolves the pointer reads: the whole folder of one table."""
    fs, path = storage.resolve(storage.join(storage.latest_data_uri(uri), "items"))
    return pq.read_table(path, filesystem=fs).sort_by("item_id")


def test_the_pointer_names_a_version_until_the_next_one_is_committed(root):
    uri = storage.join(root, "pub")
    _publish(uri, _table(4))
    a = storage.read_manifest(uri)["data_dir"]
    assert storage.read_latest(uri) == a and _latest_items(uri).equals(_table(4).sort_by("item_id"))
    b = storage.publish(uri, kind="test", config={"a": 2}, config_hash="h2", overwrite=True)
    pub = b.__enter__()
    pub.write_table("items", _table(8), num_shards=2)
    # B is written but not committed: a reader through the pointer still reads A, whole.
    assert storage.read_latest(uri) == a and _latest_items(uri).equals(_table(4).sort_by("item_id"))
    b.__exit__(None, None, None)
    assert storage.read_latest(uri) == pub.data_dir == storage.read_manifest(uri)["data_dir"]
    assert _latest_items(uri).equals(_table(8).sort_by("item_id"))
    assert not storage.exists(storage.join(uri, a))


def test_a_reader_polling_the_pointer_finds_it_whole_and_naming_committed_versions(root):
    uri = storage.join(root, "pub")
    _publish(uri, _table(2))
    committed, seen, done = [storage.read_manifest(uri)["data_dir"]], [], threading.Event()

    def poll():
        while not done.is_set():
            seen.append(storage.read_latest(uri))  # a half-written pointer is a DataError here

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(poll)
        try:
            for n in (3, 4, 5):
                _publish(uri, _table(n), overwrite=True)
                committed.append(storage.read_manifest(uri)["data_dir"])
        finally:
            done.set()
        reader.result()
    order = [committed.index(d) for d in seen]  # ValueError for a folder that was never committed
    assert order and order == sorted(order)  # never back to an older version


def test_an_open_pointer_is_never_rewritten_under_its_reader(tmp_path):
    """On a local disk the pointer is replaced by a rename, never written over in place."""
    uri = str(tmp_path / "pub")
    _publish(uri, _table(2))
    a = storage.read_latest(uri)
    with open(storage.resolve(storage.join(uri, storage.LATEST))[1], "rb") as f:
        _publish(uri, _table(3), overwrite=True)
        assert json.loads(f.read())["data_dir"] == a != storage.read_latest(uri)


def test_a_publication_without_pointer_resolves_through_its_manifest(root):
    uri = storage.join(root, "pub")
    _publish(uri, _table(3))
    fs, path = storage.resolve(storage.join(uri, storage.LATEST))
    fs.delete_file(path)  # as a publication committed before pointers existed
    assert storage.read_latest(uri) is None and storage.latest_data_uri(uri) == storage.data_uri(uri)
    with pytest.raises(NotPublished):
        storage.latest_data_uri(storage.join(root, "never"))


@pytest.mark.parametrize("body, error", [(b'{"format": "llmemb-dist/1", "data_dir"', "not valid JSON"),
                                         (b'{"format": "other", "data_dir": "x"}', "not a publication pointer"),
                                         (b'{"format": "llmemb-dist/1", "data_dir": "../elsewhere"}', "not a transaction folder")])
def test_a_bad_pointer_is_a_data_error_naming_it(tmp_path, body, error):
    uri = str(tmp_path / "pub")
    _publish(uri, _table(3))
    storage.write_bytes(storage.join(uri, storage.LATEST), body)
    with pytest.raises(DataError, match=f"_LATEST: .*{error}"):
        storage.latest_data_uri(uri)


def test_cleanup_keeps_the_folder_the_pointer_names(root):
    """A job that died between its manifest and its pointer: the pointer still names the version before."""
    uri = storage.join(root, "pub")
    _publish(uri, _table(4))
    before = "data-20200101T000000-deadbeef"
    storage.write_shards(_table(2), storage.join(uri, before, "items"), 1)
    storage.write_bytes(storage.join(uri, storage.LATEST), json.dumps({"format": storage.MANIFEST_FORMAT, "data_dir": before}).encode())
    assert storage.unreferenced_transactions(root, dt.timedelta(hours=24)) == []
    assert _latest_items(uri).num_rows == 2
    _publish(uri, _table(5), overwrite=True)  # the next commit moves the pointer on: the folder is debris now
    assert [u.rsplit("/", 1)[-1] for u in storage.unreferenced_transactions(root, dt.timedelta(hours=24))] == [before]
    assert _latest_items(uri).num_rows == 5
