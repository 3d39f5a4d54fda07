"""Files on this machine, written safely: can a folder be written, an atomic write, a file's sha256.

Shared by the local store, the S3 store's cache and everything that writes a record or a checkpoint."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def folder_problem(folder: Path) -> str | None:
    """Why `folder` could not be created and written, or None. Creates nothing."""
    folder = folder.resolve()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return (
            f"{folder} is a file, not a folder"
            if existing == folder
            else f"cannot create {folder}: {existing} is a file"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write to {existing}" + ("" if existing == folder else f" (to create {folder})")
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temp file and rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
