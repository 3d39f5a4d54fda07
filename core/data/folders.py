"""What a folder source holds: its files listed once per process (with size and modification time), labelled by
class sub-folder or by an index file.

The listing is kept while no folder it visited changed (their modification times are re-read, one stat per
folder, not per file), so the preflight, the stage cache key (`version`) and prepare_data share one scan. A file
added, removed or replaced changes its folder's time and so the listing; a file rewritten in place is seen by the
next process (every `trainflow run` and every served flow run is one).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainflow.core.config import ImageFolderDataConfig, TextFolderDataConfig
from trainflow.core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the listing's root, with forward slashes
    label: str | None  # the class (image folders); None for text
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Listing:
    root: Path  # the folder (or the index file's folder) paths are relative to
    entries: list[Entry]
    classes: list[str]  # image folders: class names in order; text: empty
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file or folder, what is wrong) found listing
    folders: dict[str, int] = field(default_factory=dict)  # every folder visited (and the index) -> mtime_ns

    def version(self) -> str:
        """Cheap identity of what the listing saw (names, sizes, times): part of prepare_data's cache key."""
        rows = [(e.path, e.label, e.size, e.mtime_ns) for e in self.entries]
        return hashlib.sha256(json.dumps([rows, self.classes, self.problems]).encode()).hexdigest()

    def still_current(self) -> bool:
        try:
            return all(os.stat(folder).st_mtime_ns == mtime for folder, mtime in self.folders.items())
        except OSError:
            return False


_LISTINGS: dict[str, Listing] = {}


def listing_of(cfg: ImageFolderDataConfig | TextFolderDataConfig) -> Listing:
    """The source's files, re-used while its folders are unchanged. Raises DataError naming the folder or index
    when it is missing or lists nothing."""
    key = cfg.model_dump_json(include={"source", "path", "index", "glob", "classes"})
    cached = _LISTINGS.get(key)
    if cached is not None and cached.still_current():
        return cached
    if isinstance(cfg, TextFolderDataConfig):
        listing = _list_glob(_folder(cfg.path, "data.path"), cfg.glob)
        if not listing.entries:
            raise DataError(f"{cfg.path}: no file matches data.glob '{cfg.glob}'")
    elif cfg.index is not None:
        listing = _list_index(Path(cfg.index), cfg.classes)
    else:
        assert cfg.path is not None
        listing = _list_class_folders(_folder(cfg.path, "data.path"), cfg.classes)
    _LISTINGS[key] = listing
    return listing


def _folder(path: str, field_name: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"{field_name}: folder '{path}' not found")
    if not folder.is_dir():
        raise DataError(f"{field_name}: '{path}' is not a folder")
    return folder


def _walk(folder: Path, root: Path, folders: dict[str, int]) -> list[tuple[str, os.stat_result]]:
    """Every file under `folder` (hidden ones skipped), relative to `root`, with its stat; records each folder."""
    found = []
    folders[str(folder)] = os.stat(folder).st_mtime_ns
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                found += _walk(Path(entry.path), root, folders)
            elif entry.is_file():
                found.append((Path(entry.path).relative_to(root).as_posix(), entry.stat()))
    return found


def _list_class_folders(root: Path, classes: list[str] | None) -> Listing:
    folders: dict[str, int] = {str(root): os.stat(root).st_mtime_ns}
    names = ordered_classes(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class sub-folders (data.path holds one sub-folder per class)")
    entries, problems = [], []
    for name in names:
        files = _walk(root / name, root, folders)
        if not files:
            problems.append((f"{root / name}", "empty class folder"))
        for rel, stat in files:
            entries.append(Entry(rel, name, stat.st_size, stat.st_mtime_ns))
    stray = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    problems += [
        (str(root / name), "a file beside the class folders (data.path holds only sub-folders)") for name in stray
    ]
    return _labelled(root, entries, problems, folders, classes or [n for n in names if (root / n).exists()])


def _list_index(index: Path, classes: list[str] | None) -> Listing:
    if not index.is_file():
        raise DataError(f"data.index: file '{index}' not found")
    try:
        frame = pd.read_json(index, lines=True) if index.suffix == ".jsonl" else pd.read_csv(index)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise DataError(f"{index}: cannot be read as an index ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing or frame.empty:
        raise DataError(f"{index}: an index needs columns path,label and at least one row (missing: {missing})")
    root = index.parent
    folders = {str(index): os.stat(index).st_mtime_ns}
    entries, problems = [], []
    for rel, label in zip(frame["path"].astype(str), frame["label"].astype(str), strict=True):
        file = root / rel
        try:
            stat = file.stat()
            folders.setdefault(str(file.parent), os.stat(file.parent).st_mtime_ns)
        except OSError as exc:
            problems.append((str(file), f"listed in {index.name} but cannot be read ({exc.strerror})"))
            continue
        entries.append(Entry(Path(rel).as_posix(), label, stat.st_size, stat.st_mtime_ns))
    natural = ordered_classes(frame["label"].astype(str))
    return _labelled(root, entries, problems, folders, classes or natural)


def _labelled(
    root: Path, entries: list[Entry], problems: list[tuple[str, str]], folders: dict[str, int], classes: list[str]
) -> Listing:
    """Entries whose label is not among `classes` are problems; so is a file that is not a PNG or JPEG."""
    kept = []
    for e in entries:
        if e.label not in classes:
            problems.append((str(root / e.path), f"label '{e.label}' is not among the classes ({', '.join(classes)})"))
        elif not e.path.lower().endswith(IMAGE_SUFFIXES):
            problems.append((str(root / e.path), "not an image (PNG or JPEG expected)"))
        else:
            kept.append(e)
    return Listing(root, kept, classes, problems, folders)


def _list_glob(root: Path, pattern: str) -> Listing:
    folders: dict[str, int] = {str(root): os.stat(root).st_mtime_ns}
    entries = []
    for file in sorted(root.glob(pattern)):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not file.is_file():
            continue
        stat = file.stat()
        folders.setdefault(str(file.parent), os.stat(file.parent).st_mtime_ns)
        entries.append(Entry(rel.as_posix(), None, stat.st_size, stat.st_mtime_ns))
    return Listing(root, entries, [], [], folders)


def ordered_classes(names: Iterable[str]) -> list[str]:
    """Class names in natural order: numerically when every name is a number (2 before 10), else sorted. The one
    rule for tables (`preprocess.split_rows`) and folders."""
    unique = sorted(set(names))
    numbers = pd.to_numeric(pd.Series(unique, dtype=object), errors="coerce")
    if numbers.notna().all():
        return [name for _, name in sorted(zip(numbers, unique, strict=True))]
    return unique


def bad_files_error(skipped: list[tuple[str, str]]) -> DataError:
    """The one line for a folder's bad files: the first, how many more, and the way out."""
    file, why = skipped[0]
    more = f" (and {len(skipped) - 1} more bad file(s))" if len(skipped) > 1 else ""
    return DataError(f"{file}: {why}{more}; fix or remove it, or set data.skip_bad_files: true")
