"""A folder of text files as a byte corpus, split by file: each file lands whole in one split, so nothing of a
test file was seen in training. Within a split, files are joined in sorted path order with `data.separator`.

A corpus up to `data.in_memory_max_mb` is read once and kept for the stage; a larger one is read once to check and
hash it, then streamed file by file into the split shards (`JoinedFiles`): never held whole."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainflow.core.config import TextFolderDataConfig
from trainflow.core.data.folders import Listing, bad_files_error, listing_of
from trainflow.core.data.prepared import SPLITS, ArraySplits, Rows
from trainflow.core.data.shards import LazyRows
from trainflow.core.errors import DataError


@dataclass(frozen=True)
class RawTextFiles:
    name: str  # the folder
    files: list[tuple[str, int]]  # (relative path, size), sorted by path; empty files left out
    separator: bytes
    content_sha256: str
    skipped: list[tuple[str, str]]  # (file, why) left out under data.skip_bad_files
    contents: dict[str, bytes] | None  # relative path -> bytes, kept when the corpus is small


def load_text_files(cfg: TextFolderDataConfig) -> RawTextFiles:
    """Every matching file, read once per listing (the preflight and the stage share the read).

    Raises:
        DataError: a file that is not UTF-8 or cannot be read (unless data.skip_bad_files), or fewer than 3
            non-empty files (one per split).
    """
    listing = listing_of(cfg)
    key = f"{listing.version()}:{cfg.separator}:{cfg.in_memory_max_mb}"
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
    files, skipped, content, kept = [], [], hashlib.sha256(), {}
    keep_up_to = cfg.in_memory_max_mb * (1 << 20)
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
            files.append((entry.path, len(data)))
            content.update(f"{entry.path}\t{hashlib.sha256(data).hexdigest()}\n".encode())
            if kept is not None:
                kept[entry.path] = data
                if sum(size for _, size in files) > keep_up_to:
                    kept = None  # larger than memory: streamed from the files when the splits are written
    return RawTextFiles(str(listing.root), files, cfg.separator.encode("utf-8"), content.hexdigest(), skipped, kept)


class JoinedFiles(LazyRows):
    """The bytes of `files` (sorted) joined with `separator`, read from the files a range at a time."""

    def __init__(self, raw: RawTextFiles, files: list[tuple[str, int]]):
        self.root, self.names, self.separator, self.contents = (
            Path(raw.name),
            [n for n, _ in files],
            raw.separator,
            raw.contents,
        )
        sizes = [size for _, size in files]
        self.starts = np.cumsum([0] + [size + len(raw.separator) for size in sizes])  # each file's first byte
        total = int(self.starts[-1]) - (len(raw.separator) if files else 0)
        self.shape, self.dtype = (total,), np.dtype(np.uint8)

    def _piece(self, k: int, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of file `k` followed by its separator (offsets within that span)."""
        if self.contents is not None:
            data = self.contents[self.names[k]]
            return (data + self.separator)[begin:end]
        size = int(self.starts[k + 1] - self.starts[k]) - len(self.separator)
        out = b""
        if begin < size:
            with (self.root / self.names[k]).open("rb") as file:
                file.seek(begin)
                out = file.read(min(end, size) - begin)
        return out + self.separator[max(0, begin - size) : max(0, end - size)]

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces, at = [], start
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while at < stop and k < len(self.names):
            begin = int(self.starts[k])
            end = min(stop, int(self.starts[k + 1]))
            pieces.append(self._piece(k, at - begin, end - begin))
            at, k = end, k + 1
        return np.frombuffer(b"".join(pieces), dtype=np.uint8).copy()

    def _take(self, index: np.ndarray) -> np.ndarray:
        if not len(index):
            return np.empty(0, np.uint8)
        low = int(index.min())
        return self._range(low, int(index.max()) + 1)[index - low]


def split_text_files(
    raw: RawTextFiles, val_fraction: float, test_fraction: float, seq_len: int, seed: int
) -> tuple[ArraySplits, dict[str, list[str]]]:
    """The train/val/test byte arrays (lazy: read when written) and which files each holds. Files are dealt in a
    seeded order: to val until it holds `val_fraction` of the bytes, then to test likewise, the rest to train."""
    sizes = np.array([size for _, size in raw.files])
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
    tokens: dict[str, Rows] = {}
    names = {}
    for split, picked in chosen.items():
        files = sorted(raw.files[i] for i in picked)
        names[split] = [name for name, _ in files]
        tokens[split] = JoinedFiles(raw, files)
        if len(tokens[split]) < seq_len + 1:
            raise DataError(
                f"{raw.name}: the {split} split holds {len(picked)} file(s), {len(tokens[split])} bytes: fewer than "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len, change the fractions or add files"
            )
    return ArraySplits(tokens, {}, [], 1), names
