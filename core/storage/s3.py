"""The S3 artifact store (`store.uri: s3://bucket/prefix`): AWS, or any S3-compatible server through
`store.endpoint_url`. The only module that talks to boto3.

Objects live under the prefix; each carries the sha256 of its content in `x-amz-meta-sha256`. A
local cache folder (`store.cache_dir`) mirrors the keys: stages write into `workdir(key)` there and
`put_file`; `local_path` downloads there once and re-downloads when the cached copy's size or sha256
no longer matches the object. Uploads go through boto3's managed transfer (multipart above a
threshold, parts checked by S3 with SHA256), are retried per request by botocore and per file here,
and are skipped when the object already holds the same content. Credentials come from boto3's chain
only and never appear in a message.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainflow.core.config.secrets import mask_secrets, resolve_optional
from trainflow.core.errors import StoreError
from trainflow.core.storage.files import folder_problem, sha256_file, write_atomic
from trainflow.core.storage.s3_errors import describe, is_retryable, is_unreachable
from trainflow.core.storage.s3_names import key_problem, split_s3_uri

if TYPE_CHECKING:
    from trainflow.core.config.sections import StoreConfig

log = logging.getLogger(__name__)

MiB = 1 << 20
FILE_ATTEMPTS = 3  # whole-file tries of an upload or download, each with botocore's own retries inside
BACKOFF_S = 1.0  # before the second try; doubles after


class S3Store:
    """Objects under `s3://bucket/prefix`, with a verified local cache. Thread-safe; picklable (for HPO
    worker processes), each process opening its own client."""

    def __init__(self, settings: StoreConfig):
        self.settings = settings
        self.bucket, self.prefix = split_s3_uri(settings.uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.cache_root = Path(settings.cache_dir).expanduser().resolve() / "s3" / self.bucket / self.prefix
        self._lock = threading.Lock()
        self._client: Any = None
        self._hashes: dict[Path, tuple[tuple[int, int, int], str]] = {}  # path -> ((size, mtime_ns, inode), sha256)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    # ------------------------------------------------------------------------------ the protocol
    def workdir(self, key: str) -> Path:
        """A local folder mirroring `key` in the cache: a stage writes there, then `put_file`s what it keeps."""
        path = self._cached(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def uri_for(self, key: str) -> str:
        """The URI `key` has (or will have) in this store; creates nothing."""
        self._object_key(key)
        return f"{self.uri}/{key}"

    def put_file(self, src: Path, key: str) -> str:
        """Upload `src` as `key` (unless the object already holds the same bytes); keep a copy in the cache."""
        src, uri, object_key = Path(src), self.uri_for(key), self._object_key(key)
        size, sha = src.stat().st_size, self._sha256(src)
        head = self._head(object_key, uri)
        if head is not None and head["ContentLength"] == size and head["Metadata"].get("sha256") == sha:
            log.debug("%s: unchanged (sha256 %s), not uploaded again", uri, sha[:12])
        else:
            self._upload(src, object_key, uri, size, sha)
        cached = self._cached(key)
        if src.resolve() != cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, cached)
            self._remember(cached, sha)
        return uri

    def put_bytes(self, data: bytes, key: str) -> str:
        """`put_file` of `data`, written into the cache first."""
        path = self._cached(key)
        write_atomic(path, data)
        return self.put_file(path, key)

    def exists(self, uri: str) -> bool:
        """Whether the object is in the store (a HEAD request)."""
        return self._head(self._object_key(self._key_of(uri)), uri) is not None

    def local_path(self, uri: str) -> Path:
        """The object as a verified local file: the cached copy when its size and sha256 match the object's,
        else a fresh download (checked the same way before it replaces the cached copy).

        Raises:
            StoreError: no such object, or it cannot be fetched or verified.
        """
        key = self._key_of(uri)
        object_key, path = self._object_key(key), self._cached(key)
        head = self._head(object_key, uri)
        if head is None:
            raise StoreError(f"{uri}: no such object in the store")
        size, sha = head["ContentLength"], head["Metadata"].get("sha256")
        if path.is_file() and path.stat().st_size == size and sha is not None and self._sha256(path) == sha:
            return path
        self._download(object_key, uri, path, size, sha)
        return path

    def check_writable(self) -> None:
        """Fail fast, in seconds and writing nothing: the cache folder can be created, credentials exist and
        are accepted, the endpoint answers, the bucket exists and the prefix may be listed.

        Raises:
            StoreError: one line naming the store and the cause.
        """
        problem = folder_problem(self.cache_root)
        if problem:
            raise StoreError(f"store.cache_dir: {problem}")
        probe = self._new_client(connect_timeout=2.0, read_timeout=5.0, attempts=2)
        try:
            try:
                probe.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                if is_unreachable(exc):
                    raise
                # HEAD answers carry no error code (403 is a bad key, a bad secret or a denial alike): ask a GET
            probe.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1)
        except Exception as exc:
            raise StoreError(f"store.uri {self.uri}: {describe(exc, self.bucket, self._endpoint)}") from None

    # --------------------------------------------------------------------------------- transfers
    def _upload(self, src: Path, object_key: str, uri: str, size: int, sha: str) -> None:
        from boto3.s3.transfer import TransferConfig

        extra: dict[str, Any] = {"Metadata": {"sha256": sha}, "ChecksumAlgorithm": "SHA256"}
        s = self.settings
        extra |= {"ServerSideEncryption": s.sse} if s.sse else {}
        extra |= {"SSEKMSKeyId": s.sse_kms_key_id} if s.sse_kms_key_id else {}
        extra |= {"StorageClass": s.storage_class} if s.storage_class else {}
        part = s.multipart_threshold_mb * MiB
        transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=s.max_concurrency)

        def attempt() -> None:
            try:
                self.client.upload_file(str(src), self.bucket, object_key, ExtraArgs=extra, Config=transfer)
            finally:
                if size >= part:
                    self._abort_unfinished(object_key)
            head = self._head(object_key, uri)
            if head is None or head["ContentLength"] != size or head["Metadata"].get("sha256") != sha:
                raise _Mismatch("the stored object does not match the file after upload")

        self._retrying(attempt, f"{uri}: upload of {src}")
        log.debug("%s: uploaded %d bytes", uri, size)

    def _download(self, object_key: str, uri: str, path: Path, size: int, sha: str | None) -> str:
        from boto3.s3.transfer import TransferConfig

        part = self.settings.multipart_threshold_mb * MiB
        transfer = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=self.settings.max_concurrency
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")

        def attempt() -> None:
            try:
                self.client.download_file(self.bucket, object_key, str(tmp), Config=transfer)
                if tmp.stat().st_size != size:
                    raise _Mismatch(f"downloaded {tmp.stat().st_size} bytes, the object has {size}")
                digest = sha256_file(tmp)
                if sha is not None and digest != sha:
                    raise _Mismatch("downloaded content does not match the object's sha256")
                os.replace(tmp, path)
                self._remember(path, digest)
                downloaded.append(digest)
            finally:
                tmp.unlink(missing_ok=True)

        downloaded: list[str] = []
        self._retrying(attempt, f"{uri}: download")
        return downloaded[-1]

    def _retrying(self, attempt: Any, what: str) -> None:
        """Run `attempt` up to FILE_ATTEMPTS times with backoff while its failure is transient."""
        for number in range(1, FILE_ATTEMPTS + 1):
            try:
                attempt()
                return
            except Exception as exc:
                if number == FILE_ATTEMPTS or not (isinstance(exc, _Mismatch) or is_retryable(exc)):
                    raise StoreError(f"{what} failed: {describe(exc, self.bucket, self._endpoint)}") from None
                log.warning("%s failed (%s); try %d of %d", what, type(exc).__name__, number + 1, FILE_ATTEMPTS)
                time.sleep(BACKOFF_S * 2 ** (number - 1))

    def _abort_unfinished(self, object_key: str) -> None:
        """Abort unfinished multipart uploads of `object_key`, so no invisible parts linger and cost: boto3
        aborts its own failed upload, but a CreateMultipartUpload whose answer was lost (and retried) leaves
        one behind. Best effort (needs s3:ListBucketMultipartUploads); an upload of the same key by another
        writer at this moment would be aborted too and retried by it. A bucket lifecycle rule
        (AbortIncompleteMultipartUpload) stays the net for a machine that died mid-upload."""
        try:
            answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=object_key)
            for upload in answer.get("Uploads", []):
                if upload["Key"] == object_key:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload["UploadId"])
        except Exception as exc:  # no permission, or the network is down: the lifecycle rule remains
            log.debug("%s: unfinished uploads not cleaned (%s)", object_key, type(exc).__name__)

    def _head(self, object_key: str, uri: str) -> dict[str, Any] | None:
        """The object's HEAD answer, or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=object_key)  # type: ignore[no-any-return]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StoreError(f"{uri}: {describe(exc, self.bucket, self._endpoint)}") from None
        except Exception as exc:
            raise StoreError(f"{uri}: {describe(exc, self.bucket, self._endpoint)}") from None

    # ------------------------------------------------------------------------------------ helpers
    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use (thread-safe; one per process)."""
        with self._lock:
            if self._client is None:
                s = self.settings
                self._client = self._new_client(s.connect_timeout_s, s.read_timeout_s, s.max_attempts)
            return self._client

    def _new_client(self, connect_timeout: float, read_timeout: float, attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        s = self.settings
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": s.retry_mode, "max_attempts": attempts},
            max_pool_connections=max(10, s.max_concurrency * 2),
            s3={"addressing_style": "path" if s.endpoint_url else "auto"},
        )
        session = boto3.session.Session()  # sessions are not thread-safe: one per client
        endpoint = resolve_optional(s.endpoint_url, "store.endpoint_url")  # resolved here, kept nowhere
        return session.client("s3", endpoint_url=endpoint, region_name=s.region, config=config)

    @property
    def _endpoint(self) -> str:
        return mask_secrets(self.settings.endpoint_url or "AWS S3")

    def _object_key(self, key: str) -> str:
        problem = key_problem(key)
        if problem:
            raise StoreError(f"{key!r}: not a valid artifact key in {self.uri} ({problem})")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key_of(self, uri: str) -> str:
        """The store key of `uri`, which must lie under this store's prefix."""
        if not uri.startswith(f"{self.uri}/"):
            raise StoreError(f"{uri}: not an artifact URI of the store {self.uri}")
        key = uri[len(self.uri) + 1 :]
        self._object_key(key)
        return key

    def _cached(self, key: str) -> Path:
        self._object_key(key)
        return self.cache_root / key

    def _sha256(self, path: Path) -> str:
        """sha256 of a file, remembered while its size, mtime and inode stay the same."""
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._hashes.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        digest = sha256_file(path)
        self._hashes[path] = (stamp, digest)
        return digest

    def _remember(self, path: Path, digest: str) -> None:
        st = path.stat()
        self._hashes[path] = ((st.st_size, st.st_mtime_ns, st.st_ino), digest)

    # ---- listing (checkpoints)
    def head(self, key: str) -> dict[str, Any] | None:
        """The object `key`'s HEAD answer (ContentLength, ETag, Metadata), or None when there is no such object.

        Raises:
            StoreError: the request failed.
        """
        return self._head(self._object_key(key), self.uri_for(key))

    def download(self, key: str, path: Path, size: int) -> str:
        """Fetch the object `key` (of `size` bytes) into `path`: a temp file, checked, then renamed; whole-file
        retries on transient faults. Returns the file's sha256.

        Raises:
            StoreError: the download failed.
        """
        return self._download(self._object_key(key), self.uri_for(key), path, size, None)

    def list_keys(self, prefix_key: str) -> list[str]:
        """Store keys of the objects under the key folder `prefix_key` (e.g. a stage's checkpoints), sorted.

        Raises:
            StoreError: the listing failed.
        """
        folder = f"{self._object_key(prefix_key.rstrip('/'))}/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                keys += [o["Key"][strip:] for o in page.get("Contents", [])]
        except Exception as exc:
            raise StoreError(
                f"{self.uri_for(prefix_key)}: listing failed: {describe(exc, self.bucket, self._endpoint)}"
            ) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete the object `key` (no error when it is absent) and its cached copy.

        Raises:
            StoreError: the request failed.
        """
        uri = self.uri_for(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except Exception as exc:
            raise StoreError(f"{uri}: delete failed: {describe(exc, self.bucket, self._endpoint)}") from None
        self._cached(key).unlink(missing_ok=True)


class _Mismatch(Exception):
    """A transfer finished but its result does not match what was sent or recorded (worth another try)."""
