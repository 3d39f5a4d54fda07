"""A folder of text files as a byte corpus, split by file: each file lands whole in one split, so nothing of a
test file was seen in training. Within a split, files are joined in sorted path order with `data.separator`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from trainflow.core.config import TextFolderDataConfig
from trainflow.core.data.folders import Listing, bad_files_error, listing_of
from trainflow.core.data.prepared import SPLITS, ArraySplits
from trainflow.core.errors import DataError


@dataclass(frozen=True)
class RawTextFiles:
    name: str  # the folder
    files: list[tuple[str, bytes]]  # (relative path, content), sorted by path; empty files left out
    separator: bytes
    content_sha256: str
    skipped: list[tuple[str, str]]  # (file, why) left out under data.skip_bad_files


def load_text_files(cfg: TextFolderDataConfig) -> RawTextFiles:
    """Every matching file, read once per listing (the preflight and the stage share the read).

    Raises:
        DataError: a file that is not UTF-8 or cannot be read (unless data.skip_bad_files), or fewer than 3
            non-empty files (one per split).
    """
    listing = listing_of(cfg)
    key = f"{listing.version()}:{cfg.separator}"
    raw = _READ.get(key) or _read(listing, cfg)
    _READ.clear()  # one corpus in memory at a time
    _READ[key] = raw
    if raw.skipped and not cfg.skip_bad_files:
        raise bad_files_error(raw.skipped)
    if len(raw.files) < 3:
        raise DataError(f"{cfg.path}: {len(raw.files)} non-empty file(s) match data.glob '{cfg.glob}'; a split by "
                        "file needs at least 3 (train, val, test)")  # fmt: skip
    return raw


_READ: dict[str, RawTextFiles] = {}


def _read(listing: Listing, cfg: TextFolderDataConfig) -> RawTextFiles:
    files, skipped, content = [], [], hashlib.sha256()
    for entry in listing.entries:
        path = listing.root / entry.path
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except OSError as exc:
            skipped.append((str(path), f"cannot be read ({exc.strerror})"))
            continue
        except UnicodeDecodeError as exc:
            skipped.append((str(path), f"not UTF-8 text (byte {exc.start})"))
            continue
        if data:
            files.append((entry.path, data))
            content.update(f"{entry.path}\t{hashlib.sha256(data).hexdigest()}\n".encode())
    return RawTextFiles(str(listing.root), files, cfg.separator.encode("utf-8"), content.hexdigest(), skipped)


def split_text_files(
    raw: RawTextFiles, val_fraction: float, test_fraction: float, seq_len: int, seed: int
) -> tuple[ArraySplits, dict[str, list[str]]]:
    """Byte arrays of the train/val/test files and which files each holds. Files are dealt in a seeded order:
    to val until it holds `val_fraction` of the bytes, then to test likewise, the rest to train."""
    sizes = np.array([len(data) for _, data in raw.files])
    order = np.random.default_rng(seed).permutation(len(raw.files))
    chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
    targets = {"val": val_fraction * sizes.sum(), "test": test_fraction * sizes.sum()}
    held = {"val": 0, "test": 0}
    for i in order:
        split = next((s for s in ("val", "test") if held[s] < targets[s]), "train")
        if split != "train" and len(chosen["train"]) == 0 and len(order) - sum(map(len, chosen.values())) == 1:
            split = "train"  # the last file: training needs one
        chosen[split].append(int(i))
        if split != "train":
            held[split] += int(sizes[i])
    tokens, names = {}, {}
    for split, picked in chosen.items():
        files = sorted(raw.files[i] for i in picked)
        names[split] = [name for name, _ in files]
        tokens[split] = np.frombuffer(raw.separator.join(data for _, data in files), dtype=np.uint8).copy()
        if len(tokens[split]) < seq_len + 1:
            raise DataError(
                f"{raw.name}: the {split} split holds {len(picked)} file(s), {len(tokens[split])} bytes: fewer than "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len, change the fractions or add files"
            )
    return ArraySplits(tokens, {}, [], 1), names
