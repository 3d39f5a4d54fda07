"""The artifact store: where prepared data, checkpoints, published models and the stage cache live.

Stages address artifacts by URI (`file:///...` here; `s3://...` in `s3.py`, through the same
protocol). A stage writes into `workdir(key)` and calls `put_file`; for the local store the
working folder is the final place, so nothing is copied twice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlparse

from trainflow.core.errors import StoreError
from trainflow.core.storage.files import folder_problem, write_atomic

if TYPE_CHECKING:
    from trainflow.core.config.sections import StoreConfig


class ArtifactStore(Protocol):
    uri: str

    def workdir(self, key: str) -> Path: ...
    def uri_for(self, key: str) -> str: ...
    def put_file(self, src: Path, key: str) -> str: ...
    def put_bytes(self, data: bytes, key: str) -> str: ...
    def exists(self, uri: str) -> bool: ...
    def local_path(self, uri: str) -> Path: ...
    def check_writable(self) -> None: ...


class LocalStore:
    """A folder on this machine; keys are relative POSIX paths under it."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.root = Path(unquote(urlparse(root).path) if root.startswith("file://") else root).resolve()
        self.uri = self.root.as_uri()

    def workdir(self, key: str) -> Path:
        """A local folder for a stage to write into; here it is the artifact's final place."""
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def uri_for(self, key: str) -> str:
        """The URI `key` has (or will have) in this store; creates nothing."""
        return self._path(key).as_uri()

    def put_file(self, src: Path, key: str) -> str:
        dst = self._path(key)
        if Path(src).resolve() != dst:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        return dst.as_uri()

    def put_bytes(self, data: bytes, key: str) -> str:
        dst = self._path(key)
        write_atomic(dst, data)
        return dst.as_uri()

    def exists(self, uri: str) -> bool:
        return self.local_path(uri).is_file()

    def local_path(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            raise StoreError(f"{uri}: not a local artifact URI")
        return Path(unquote(parsed.path) if parsed.scheme else uri)

    def check_writable(self) -> None:
        """Fail fast, before any compute, when the store folder cannot be created or written (creates nothing)."""
        problem = folder_problem(self.root)
        if problem:
            raise StoreError(f"store.uri: {problem}")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StoreError(f"{key}: artifact key escapes the store folder {self.root}")
        return path


def open_store(target: str | os.PathLike[str] | StoreConfig) -> ArtifactStore:
    """The store for a `store` config section (or a bare `store.uri` or folder, other settings at their
    defaults): `s3://bucket[/prefix]` is an `S3Store`, a folder or `file://` URI a `LocalStore`."""
    if isinstance(target, str | os.PathLike):
        uri, settings = os.fspath(target), None
    else:
        uri, settings = target.uri, target
    if uri.startswith("s3://"):
        from trainflow.core.config.sections import StoreConfig
        from trainflow.core.storage.s3 import S3Store

        return S3Store(settings or StoreConfig(uri=uri))
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"{uri}: only local folders and s3://bucket[/prefix] are supported as artifact store")
    return LocalStore(uri)


def resolved(settings: StoreConfig) -> StoreConfig:
    """`settings` with its local paths absolute (the folder's `file://` URI, the S3 cache folder), so stage
    threads and worker processes open the very same store wherever they run from."""
    if settings.uri.startswith("s3://"):
        return settings.model_copy(update={"cache_dir": str(Path(settings.cache_dir).expanduser().resolve())})
    return settings.model_copy(update={"uri": LocalStore(settings.uri).uri})
