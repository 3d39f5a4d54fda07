"""What code produced an artifact: hashes of what trainflow's stage code and a model factory run, and the git commit.

A Python file is hashed as its syntax tree without docstrings or positions (`ast.dump`), so comments,
docstrings, blank lines and moved lines leave the stage cache alone while any code change re-runs the
stages. Parsing ~100 files takes ~0.5 s on a small machine, so each file's digest is kept by its (size,
mtime, ctime) in memory and, between processes, in `$XDG_CACHE_HOME/trainflow/` (`~/.cache/trainflow/`),
as Python keeps .pyc files.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import os
import platform
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from functools import cache, lru_cache
from pathlib import Path

from trainflow.core.errors import ConfigError

log = logging.getLogger(__name__)

_PACKAGES = ("core", "tasks")  # the code that computes stage results
# core/storage/version.py -> the checkout, or site-packages/trainflow in a wheel: core/ and tasks/ sit under both
_ROOT = Path(__file__).resolve().parents[2]
_RACY_NS = 2_000_000_000  # a digest is kept only for a file unmodified this long: a later edit gets a newer mtime
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (first 16 hex digits) of what the stage code (every .py file under core/ and tasks/) runs:
    editing its code invalidates the stage cache, which a git commit alone would not (uncommitted edits)."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(_ROOT).as_posix().encode())
        digest.update(_DIGESTS.of(path))
    _DIGESTS.save()
    return digest.hexdigest()[:16]


def model_code_version(factory: str) -> str:
    """What a `model.factory` ("package.module:function") runs, found without importing it.

    Returns:
        `<distribution>==<version>` for a module of an installed distribution; else `sha256:<16 hex>` of its
        file, or of every .py file of its top-level package (a module from the working folder or PYTHONPATH);
        `python==<version>` for a module built into the interpreter.

    Raises:
        ConfigError: no top-level module of that name can be found.
    """
    top = factory.partition(":")[0].partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # an empty name; a module in sys.modules without a spec
        spec = None
    if spec is None:
        raise ConfigError(f"model.factory: cannot import '{factory}' (No module named '{top}')")
    roots = [Path(p) for p in spec.submodule_search_locations or ()]
    if not roots and not (spec.has_location and spec.origin):
        return f"python=={platform.python_version()}"
    where = roots[0] if roots else Path(spec.origin)
    if _installed(where) and (dists := _distributions(top, where.resolve().parent, namespace=not spec.origin)):
        from importlib.metadata import version  # ~30 ms to import, for installed factories only

        return ",".join(f"{name}=={version(name)}" for name in dists)
    if roots:
        files = {path: path.relative_to(root) for root in roots for path in sorted(root.rglob("*.py"))}
    else:
        files = {where: Path(where.name)}
    digest = hashlib.sha256()
    for path, name in files.items():
        digest.update(name.as_posix().encode())
        digest.update(_DIGESTS.of(path))
    _DIGESTS.save()
    return f"sha256:{digest.hexdigest()[:16]}"


def source_digest(path: Path) -> bytes:
    """sha256 of what a Python file runs: its syntax tree less docstrings and positions (the raw bytes of a
    file that does not parse, such as a compiled extension)."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        return hashlib.sha256(b"raw\0" + source).digest()
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED) and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).digest()


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


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _installed(path: Path) -> bool:
    """Whether `path` lies in a site-packages folder (where installers put distributions)."""
    folders = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        folders.add(site.getusersitepackages())
    path = path.resolve()
    return any(path.is_relative_to(Path(folder).resolve()) for folder in folders)


@cache
def _distributions(top: str, site_folder: Path, namespace: bool) -> tuple[str, ...]:
    """Names of the distributions in `site_folder` that install the top-level module `top` (several share a
    namespace package). Reads top_level.txt, then RECORD where that finds none or may miss some (a namespace);
    `packages_distributions()` would read every RECORD, ~1 s on a small machine."""
    from importlib.metadata import distributions

    dists = list(distributions(path=[str(site_folder)]))
    owners = {d for d in dists if top in (d.read_text("top_level.txt") or "").split()}
    if namespace or not owners:
        prefixes = (f"\n{top}/", f"\n{top}.")  # top/__init__.py,sha256=... or top.py / top.cpython-311-....so
        owners |= {d for d in dists if any(p in "\n" + (d.read_text("RECORD") or "") for p in prefixes)}
    return tuple(sorted({d.metadata["Name"] for d in owners}))


class _Digests:
    """`source_digest` of each file by absolute path, trusted while its (size, mtime_ns, ctime_ns) stay the same:
    in memory, and in a JSON file for the next process (per Python version, whose `ast.dump` may differ)."""

    def __init__(self) -> None:
        self.entries: dict[str, list[int | str]] | None = None  # path -> [size, mtime_ns, ctime_ns, hex digest]
        self.changed = False

    def of(self, path: Path) -> bytes:
        if self.entries is None:
            self.entries = self._read()
        key, stamp = os.path.abspath(path), _stamp(path)
        entry = self.entries.get(key)
        if entry is not None and entry[:3] == stamp:
            return bytes.fromhex(str(entry[3]))
        digest = source_digest(path)
        if time.time_ns() - max(stamp[1:]) > _RACY_NS:
            self.entries[key] = [*stamp, digest.hex()]
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the new digests, merged with those other processes wrote; entries of edited or deleted files go."""
        if not self.changed or self.entries is None:
            return
        merged = self._read() | self.entries
        fresh = {key: entry for key, entry in merged.items() if _stamp(Path(key)) == entry[:3]}
        try:
            file = _cache_file()
            file.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=file.parent, suffix=".tmp", delete=False) as out:
                json.dump(fresh, out)
            os.replace(out.name, file)  # readers see the old file or the new one, never half of one
            self.changed = False
        except (OSError, RuntimeError) as exc:  # a read-only or missing home: the digests are recomputed next time
            log.debug("cannot write the source digest cache: %s", exc)

    def _read(self) -> dict[str, list[int | str]]:
        try:
            entries = json.loads(_cache_file().read_text())
        except (OSError, RuntimeError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {key: entry for key, entry in entries.items() if isinstance(entry, list) and len(entry) == 4}


def _stamp(path: Path) -> list[int]:
    try:
        stat = path.stat()
    except OSError:
        return []
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _cache_file() -> Path:
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return folder / "trainflow" / f"source-digests.{sys.implementation.cache_tag}.json"


_DIGESTS = _Digests()
