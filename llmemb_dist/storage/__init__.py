"""The one package that knows object storage: URIs (`uris`), files (`files`), Parquet shards (`parquet`),
and the publish protocol (`publish` writes a publication, `manifest` reads one).

Callers use the names below as `storage.<name>`; which module defines one is the package's own business.
"""
from llmemb_dist.storage.files import (COPY_THREADS, copy_files, delete_tree, download, download_dir, exists,
                                       list_dirs, read_bytes, upload_dir, write_bytes)
from llmemb_dist.storage.manifest import (LATEST, MANIFEST, MANIFEST_FORMAT, TRANSACTION, NotPublished, data_uri,
                                          is_published, latest_data_uri, read_latest, read_manifest, read_table,
                                          table_files)
from llmemb_dist.storage.parquet import read_parquet_files, read_schema, write_batches, write_shards
from llmemb_dist.storage.publish import (AlreadyPublished, Publication, already_published, code_version, publish,
                                         stable_names, unreferenced_transactions)
from llmemb_dist.storage.uris import (S3_CONNECT_TIMEOUT, S3_MAX_ATTEMPTS, S3_REQUEST_TIMEOUT, DataError,
                                      StorageError, is_s3, join, resolve, s3_client, s3_endpoint, s3_filesystem)

__all__ = [
    "COPY_THREADS", "LATEST", "MANIFEST", "MANIFEST_FORMAT", "S3_CONNECT_TIMEOUT", "S3_MAX_ATTEMPTS",
    "S3_REQUEST_TIMEOUT", "TRANSACTION", "AlreadyPublished", "DataError", "NotPublished", "Publication",
    "StorageError", "already_published", "code_version", "copy_files", "data_uri", "delete_tree", "download",
    "download_dir", "exists", "is_published", "is_s3", "join", "latest_data_uri", "list_dirs", "publish",
    "read_bytes", "read_latest", "read_manifest", "read_parquet_files", "read_schema", "read_table", "resolve",
    "s3_client", "s3_endpoint", "s3_filesystem", "stable_names", "table_files", "unreferenced_transactions",
    "upload_dir", "write_batches", "write_bytes", "write_shards",
]
