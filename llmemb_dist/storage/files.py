"""Files and folders at a URI: bytes, trees, copies, uploads and downloads."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from llmemb_dist.storage.uris import _storage_errors, is_s3, resolve


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file: {uri}")
        with fs.open_input_stream(path) as f:
            return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    with _storage_errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


COPY_THREADS = 16  # copies are requests to the store, not work of this process: many at once


def copy_files(pairs: list[tuple[str, str]]) -> None:
    """Copies files (source URI, target URI) without passing their bytes through this process: a hard link
    on a local disk (a plain copy across devices), a server-side copy on S3. Published files never change,
    so a link shares nothing that could be altered under a reader."""
    from concurrent.futures import ThreadPoolExecutor

    def copy(pair: tuple[str, str]) -> None:
        (fs, source), (_, target) = resolve(pair[0]), resolve(pair[1])
        with _storage_errors(pair[0]):
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if is_s3(pair[0]):
                fs.copy_file(source, target)
                return
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(copy, pairs))


def list_dirs(uri: str) -> list[str]:
    """Names of the sub-folders of a folder (empty if it does not exist)."""
    fs, path = resolve(uri)
    with _storage_errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def upload_dir(local_dir: str | Path, uri: str) -> list[str]:
    """Copies a local folder to a URI; returns the relative paths copied."""
    fs, path = resolve(uri)
    local_dir = Path(local_dir)
    rel_paths = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    with _storage_errors(uri):
        for rel in rel_paths:
            target = f"{path}/{rel}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local_dir / rel), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return rel_paths


def download(uri: str, local_dir: str | Path) -> Path:
    """Copies a file or folder from a URI into `local_dir`, keeping its name; returns the local path."""
    fs, path = resolve(uri)
    with _storage_errors(uri):
        kind = fs.get_file_info(path).type
    target = Path(local_dir) / path.rstrip("/").rsplit("/", 1)[-1]
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    if kind == pafs.FileType.Directory:
        return download_dir(uri, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(read_bytes(uri))
    return target


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copies a folder from a URI to a local folder (written beside, then renamed into place)."""
    fs, path = resolve(uri)
    local_dir = Path(local_dir)
    if local_dir.exists():
        return local_dir
    tmp = Path(tempfile.mkdtemp(dir=local_dir.parent if local_dir.parent.exists() else None, prefix=".dl-"))
    with _storage_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such folder: {uri}")
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(local_dir)
    except OSError:  # another process on this node finished first; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir
