"""What code produced an artifact: a content hash of the pipeline's sources, and the git commit."""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path

_PACKAGES = ("core", "tasks")  # the code that computes stage results
_ROOT = Path(__file__).resolve().parents[2]  # core/storage/version.py -> the checkout


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (first 16 hex digits) of every .py file of the stage code: editing any of it
    invalidates the stage cache, which a git commit alone would not (uncommitted edits)."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def source_files() -> list[Path]:
    """The files `code_version` hashes: every .py file under core/ and tasks/."""
    files = [path for package in _PACKAGES for path in sorted((_ROOT / package).rglob("*.py"))]
    assert files, f"no stage code found under {_ROOT}"  # an empty hash would never invalidate the cache
    return files


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout holding this code (suffixed `-dirty` with local edits), or None outside git."""
    root = _ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
