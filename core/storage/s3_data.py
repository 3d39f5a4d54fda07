"""Datasets at `s3://bucket/key` (`data.path`): fetched once into the local cache, re-used while the object's
ETag and size stay the same.

A copy lives at `<store.cache_dir>/s3-data/<bucket>/<key>` beside `<name>.s3meta.json` holding the ETag, size
and sha256 it was downloaded as. A HEAD per use decides: same ETag and size, and the file still has the
recorded size, means no GET; anything else downloads again (to a temp file, size-checked, then renamed).
The S3 settings (endpoint, region, timeouts, retries) are the `store` section's, so a dataset in another
bucket of the same endpoint is read with the same client settings and credential chain.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from trainflow.core.config.sections import StoreConfig
from trainflow.core.errors import DataError, StoreError
from trainflow.core.storage.files import write_atomic
from trainflow.core.storage.s3 import S3Store
from trainflow.core.storage.s3_names import key_problem, split_s3_uri

log = logging.getLogger(__name__)

_stores: dict[str, S3Store] = {}  # one client per bucket and settings, per process
_lock = threading.Lock()


def is_s3(path: str | None) -> bool:
    return path is not None and path.startswith("s3://")


def data_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot name a dataset object (bad bucket, no key, bad key), or None. No network."""
    try:
        _, key = split_s3_uri(uri)
    except ValueError as exc:
        return str(exc)
    if not key or uri.endswith("/"):
        return f"'{uri}' names no object (expected s3://bucket/key)"
    return key_problem(key)


def fetch_dataset(uri: str, settings: StoreConfig | None, field: str = "data.path") -> Path:
    """The object at `uri` as a local file, downloaded only when the cached copy is missing or stale.

    Raises:
        DataError: no such object (one line naming `field` and the URI).
        StoreError: the endpoint, credentials or transfer failed (one line, no credentials).
    """
    problem = data_uri_problem(uri)
    if problem:
        raise DataError(f"{field}: {problem}")
    bucket, key = split_s3_uri(uri)
    store = _store(bucket, settings)
    try:
        head = store.head(key)
    except StoreError as exc:
        raise StoreError(f"{field}: {exc}") from None
    if head is None:
        raise DataError(f"{field}: {uri} not found (no such object)")
    etag, size = head["ETag"], head["ContentLength"]
    root = Path(store.settings.cache_dir).expanduser().resolve() / "s3-data" / bucket
    path = root / key
    meta_path = path.with_name(f"{path.name}.s3meta.json")
    if path.is_file() and path.stat().st_size == size and _meta(meta_path) == {"etag": etag, "size": size}:
        log.debug("%s: cached copy is current (ETag %s)", uri, etag)
        return path
    log.info("%s: downloading %d bytes into %s", uri, size, path)
    sha256 = store.download(key, path, size)
    write_atomic(meta_path, json.dumps({"etag": etag, "size": size, "sha256": sha256}).encode())
    return path


def _store(bucket: str, settings: StoreConfig | None) -> S3Store:
    """An S3Store on `bucket` with the store section's S3 settings (its client is what we use)."""
    base = settings if settings is not None else StoreConfig()
    bucket_settings = base.model_copy(update={"uri": f"s3://{bucket}"})
    name = bucket_settings.model_dump_json()
    with _lock:
        if name not in _stores:
            _stores[name] = S3Store(bucket_settings)
        return _stores[name]


def _meta(path: Path) -> dict[str, Any] | None:
    """The ETag and size the cached copy was downloaded as, or None."""
    try:
        data = json.loads(path.read_text())
        return {"etag": data["etag"], "size": data["size"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
