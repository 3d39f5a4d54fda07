"""Prefect result storage inside an s3:// artifact store: stage cache records at `<store>/.cache/prefect/<key>`.

Why a small `WritableFileSystem` over `S3Store` rather than prefect-aws's `S3Bucket`: the records then go
through the same client, credential chain, endpoint, retries and timeouts as the artifacts they point to
(one `store` section, no second set of S3 settings to keep in step), every write carries our sha256 and is
checked after upload, every read is verified against it (a torn or altered record is refetched, never
unpickled half-written), and no extra dependency is needed. A second machine pointed at the same bucket,
with an empty cache folder, finds the records and gets `Cached` stages.

Prefect takes only blocks saved on its server as a task's `result_storage`, so `saved_result_storage`
saves one per store setting (named by their hash, overwritten in place). The record lookup uses the
block the flow passes, never the block id a record names, so another machine's server needs none of
ours. The settings saved carry no credentials (boto3's chain supplies them): nothing secret is stored.
"""

from __future__ import annotations

import hashlib
import logging

import anyio.to_thread
from prefect.filesystems import WritableFileSystem
from pydantic import PrivateAttr

from trainflow.core.config import StoreConfig
from trainflow.core.storage.s3 import S3Store
from trainflow.core.storage.store import open_store

log = logging.getLogger(__name__)

RECORDS = ".cache/prefect"  # the folder of stage records, under the store's prefix


class StoreResultStorage(WritableFileSystem):
    """Prefect records as objects of an s3:// artifact store (`<store>/.cache/prefect/<key>`)."""

    _block_type_name = "Trainflow Store Results"
    store: StoreConfig

    _opened: S3Store | None = PrivateAttr(None)

    def _s3(self) -> S3Store:
        if self._opened is None:
            opened = open_store(self.store)
            assert isinstance(opened, S3Store), "StoreResultStorage is for s3:// stores only"
            self._opened = opened
        return self._opened

    def _uri(self, path: str) -> str:
        return self._s3().uri_for(f"{RECORDS}/{path}")

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # type: ignore[override]
        """The record's bytes, downloaded and verified against its sha256. Raises StoreError when absent
        (Prefect's lookup takes any error as "no record")."""
        return self._s3().local_path(self._uri(path)).read_bytes()

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:  # type: ignore[override]
        """Upload the record (verified); returns its URI."""
        return self._s3().put_bytes(content, f"{RECORDS}/{path}")

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)

    def delete_path(self, path: str) -> None:
        """Remove the record from the bucket and this machine's cache (a stale record: its artifacts are gone).

        Raises:
            StoreError: the request failed (naming the record and the cause).
        """
        self._s3().delete(f"{RECORDS}/{path}")


def saved_result_storage(store: StoreConfig) -> StoreResultStorage:
    """The result storage of an s3:// store, saved on the Prefect server (as Prefect requires)."""
    block = StoreResultStorage(store=store)
    name = "trainflow-store-" + hashlib.sha256(store.model_dump_json().encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block
