"""Prepared arrays larger than memory: each array written as raw `.npy` shards of a bounded size with an index
(dtype, shape, each shard's rows and sha256), and read back lazily.

`ShardedArray` maps a shard only when one of its rows is first asked for (on an s3:// store the shard is fetched
into the local cache then, and verified by its sha256), and a read copies out only the rows asked for: a process
holds the batches it reads in anonymous memory, while the mapped pages belong to the kernel's page cache, which
gives them back under pressure. `Normalized` turns stored uint8 pixels into the model's float32 inputs per read,
with the very function the in-memory path applies to a whole split, so both give the same numbers.

Every lazy array reads like an ndarray where the stages need it: `len`, `shape`, `dtype`, `a[i]`, `a[i:j]` and
`a[indices]` (any integer array, e.g. a sampler's batch), and `np.asarray(a)` to materialise one (small) split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trainflow.core.storage.files import sha256_file

SHARDS_FORMAT = "trainflow-shards/1"
CHUNK_BYTES = 16 << 20  # rows copied per step when a lazy array is streamed into shards or materialised


class LazyRows:
    """Rows read on demand; subclasses give `shape`, `dtype` and `_take` (rows at an int64 index)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    def _take(self, index: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _range(self, start: int, stop: int) -> np.ndarray:
        return self._take(np.arange(start, stop, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            return self._take(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(key, int | np.integer):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} rows")
            return self._range(i, i + 1)[0]
        index = np.asarray(key, dtype=np.int64)
        flat = index.reshape(-1)
        flat = np.where(flat < 0, flat + len(self), flat)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows")
        return self._take(flat).reshape(*index.shape, *self.shape[1:])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        whole = self._range(0, len(self))
        return whole if dtype is None else whole.astype(dtype)


class ShardedArray(LazyRows):
    """An array stored as `.npy` shards, each mapped (and, from an s3:// store, fetched) on first use.

    `fetch` turns a shard's URI into a local file (the store's `local_path`: on s3:// a verified cached copy).
    Picklable: a DataLoader worker or a spawned process maps the shards again itself."""

    def __init__(self, entry: dict[str, Any], uri_of: Callable[[str], str], fetch: Callable[[str], Path]):
        self.shape, self.dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        self.uris = [uri_of(shard["file"]) for shard in entry["shards"]]
        rows = np.array([shard["rows"] for shard in entry["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(rows)])
        if self.starts[-1] != self.shape[0]:
            raise ValueError(f"{self.uris[0] if self.uris else entry}: shards hold {self.starts[-1]} rows, "
                             f"the index says {self.shape[0]}")  # fmt: skip
        self.fetch = fetch
        self._mapped: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_mapped": {}}

    def shard(self, k: int) -> np.ndarray:
        """Shard `k`, memory-mapped read-only."""
        mapped = self._mapped.get(k)
        if mapped is None:
            path = self.fetch(self.uris[k])
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            if mapped.shape[1:] != self.shape[1:] or len(mapped) != self.starts[k + 1] - self.starts[k]:
                raise ValueError(f"{self.uris[k]}: shard shape {mapped.shape} differs from its index")
            self._mapped[k] = mapped
        return mapped

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, at = [], start
        for k in range(max(first, 0), len(self.uris)):
            if at >= stop:
                break
            begin, end = int(self.starts[k]), int(self.starts[k + 1])
            pieces.append(self.shard(k)[at - begin : min(stop, end) - begin])
            at = min(stop, end)
        if not pieces:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def _take(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.starts, index, side="right") - 1
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.shard(int(k))[index[mask] - self.starts[k]]
        return out


class Selected(LazyRows):
    """Rows `index` of `base`, in that order (a split of a larger array), read when asked for."""

    def __init__(self, base: LazyRows | np.ndarray, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.shape, self.dtype = (len(self.index), *base.shape[1:]), np.dtype(base.dtype)

    def _take(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.base[self.index[index]])


class Normalized(LazyRows):
    """uint8 pixels read as the model's float32 inputs, normalised per read with `trainflow_images.normalized`."""

    def __init__(self, pixels: LazyRows, mean: list[float], std: list[float]):
        self.pixels, self.mean, self.std = pixels, mean, std
        self.shape, self.dtype = pixels.shape, np.dtype(np.float32)

    def _take(self, index: np.ndarray) -> np.ndarray:
        from trainflow.core.serving.trainflow_images import normalized

        return normalized(self.pixels[index], self.mean, self.std)

    def _range(self, start: int, stop: int) -> np.ndarray:
        from trainflow.core.serving.trainflow_images import normalized

        return normalized(self.pixels[start:stop], self.mean, self.std)


class ShardWriter:
    """Rows appended in order, written as `<name>.<k>.npy` shards of at most `shard_bytes` into `folder`; only
    the shard being filled is held in memory. `close()` gives the index entry."""

    def __init__(self, folder: Path, name: str, row_shape: tuple[int, ...], dtype: Any, shard_bytes: int):
        self.folder, self.name, self.row_shape, self.dtype = folder, name, tuple(row_shape), np.dtype(dtype)
        row_bytes = max(1, math.prod(self.row_shape) * self.dtype.itemsize)
        self._buffer = np.empty((max(1, shard_bytes // row_bytes), *self.row_shape), self.dtype)
        self._filled, self.rows = 0, 0
        self.shards: list[dict[str, Any]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        at = 0
        while at < len(rows):
            take = min(len(rows) - at, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = rows[at : at + take]
            self._filled, at = self._filled + take, at + take
            if self._filled == len(self._buffer):
                self._flush()

    def _flush(self) -> None:
        if self._filled == 0 and self.shards:
            return
        file = f"{self.name}.{len(self.shards):05d}.npy"
        path = self.folder / file
        np.save(path, self._buffer[: self._filled], allow_pickle=False)
        self.shards.append({"file": file, "rows": self._filled, "sha256": sha256_file(path)})
        self.rows += self._filled
        self._filled = 0

    def close(self) -> dict[str, Any]:
        self._flush()
        self._buffer = np.empty((0, *self.row_shape), self.dtype)  # the shard buffer is freed
        return {"dtype": self.dtype.str, "shape": [self.rows, *self.row_shape], "shards": self.shards}


def write_rows(writer: ShardWriter, rows: np.ndarray | LazyRows) -> dict[str, Any]:
    """Stream `rows` (an array or a lazy one) into `writer`, a bounded chunk at a time, and close it."""
    per_chunk = max(1, CHUNK_BYTES // max(1, math.prod(rows.shape[1:]) * rows.dtype.itemsize))
    for start in range(0, len(rows), per_chunk):
        writer.append(rows[start : start + per_chunk])
    return writer.close()
