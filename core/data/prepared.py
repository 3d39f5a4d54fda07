"""The prepared arrays (`ArraySplits`) and how they sit in the store, in one of two layouts:

- `memory`: one .npz per fingerprint, read whole once per process (small data: fastest, and what the
  trainer-overhead figures assume);
- `shards`: above `data.in_memory_max_mb`, every array as .npy shards with an index (`splits.json`), read lazily
  by every stage (`core/data/shards.py`): no process ever holds a whole split.

Free of scikit-learn and pandas, so HPO workers and the training loop do not load them."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from trainflow.core.data.shards import SHARDS_FORMAT, LazyRows, Normalized, ShardedArray, ShardWriter, write_rows

if TYPE_CHECKING:
    from trainflow.core.records import PrepareDataResult
    from trainflow.core.storage.store import ArtifactStore

Rows = np.ndarray | LazyRows  # what a split's array is: in memory, or read on demand
Layout = Literal["memory", "shards"]


@dataclass(frozen=True)
class ArraySplits:
    """Model-ready arrays: features float32 shaped like the model input, labels int64 (or byte tokens)."""

    x: dict[str, Rows]  # split name -> features, or tokens for text
    y: dict[str, Rows]  # split name -> labels; empty for text
    class_names: list[str]
    n_features: int


SPLITS = ("train", "val", "test")


def layout_for(nbytes: int, in_memory_max_mb: float) -> Layout:
    """`shards` when the model-ready arrays would take more than `in_memory_max_mb` in memory."""
    return "shards" if nbytes > in_memory_max_mb * (1 << 20) else "memory"


def splits_to_npz(splits: ArraySplits) -> bytes:
    """`x_train, y_train, x_val, ...` (no `y_*` for text) in one uncompressed .npz."""
    arrays = {f"x_{s}": np.asarray(a) for s, a in splits.x.items()}
    arrays |= {f"y_{s}": np.asarray(a) for s, a in splits.y.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_splits(
    splits: ArraySplits,
    store: ArtifactStore,
    folder: str,
    layout: Layout,
    shard_mb: float,
    pixels: tuple[list[float], list[float]] | None = None,
) -> str:
    """Store `splits` under `folder` in `layout`; the URI the stages load them from. For shards, `pixels` =
    (mean, std): the x arrays are uint8 pixels, normalised on every read (4x less to store and read)."""
    if layout == "memory":
        return store.put_bytes(splits_to_npz(splits), f"{folder}/splits.npz")
    workdir = store.workdir(folder)
    arrays: dict[str, Any] = {}
    for prefix, group in (("x", splits.x), ("y", splits.y)):
        for split, rows in group.items():
            name = f"{prefix}_{split}"
            writer = ShardWriter(workdir, name, tuple(rows.shape[1:]), rows.dtype, int(shard_mb * (1 << 20)))
            arrays[name] = write_rows(writer, rows)
            for shard in arrays[name]["shards"]:
                store.put_file(workdir / shard["file"], f"{folder}/{shard['file']}")
    index = {"format": SHARDS_FORMAT, "arrays": arrays, "pixel_mean": pixels[0] if pixels else None,
             "pixel_std": pixels[1] if pixels else None}  # fmt: skip
    return store.put_bytes(json.dumps(index, indent=1).encode(), f"{folder}/splits.json")  # last: complete


def load_splits(store: ArtifactStore, data: PrepareDataResult) -> ArraySplits:
    """The prepared arrays of `data`. The LR range test, HPO trials, training, evaluation, compression and
    publishing all ask for them, so each process reads them once (keyed by URI and mtime); do not modify them.
    Shards come back as lazy arrays, each shard mapped (fetched, on s3://) on first use."""
    path = store.local_path(data.uri)
    if data.uri.endswith(".npz"):
        x, y = _read_npz(str(path), path.stat().st_mtime_ns)
    else:
        x, y = _read_index(str(path), path.stat().st_mtime_ns, data.uri, store)
    return ArraySplits(x, y, data.spec.class_names, int(np.prod(data.spec.input_shape)))


@functools.lru_cache(maxsize=2)
def _read_npz(path: str, mtime_ns: int) -> tuple[dict[str, Rows], dict[str, Rows]]:
    with np.load(path) as npz:
        x: dict[str, Rows] = {s: npz[f"x_{s}"] for s in SPLITS}
        y: dict[str, Rows] = {s: npz[f"y_{s}"] for s in SPLITS if f"y_{s}" in npz}
    return x, y


@functools.lru_cache(maxsize=2)
def _read_index(path: str, mtime_ns: int, uri: str, store: ArtifactStore) -> tuple[dict[str, Rows], dict[str, Rows]]:
    index = json.loads(Path(path).read_text(encoding="utf-8"))
    if index.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{uri}: not a trainflow shard index ({index.get('format')!r})")
    base = uri.rsplit("/", 1)[0]
    arrays = {name: ShardedArray(entry, lambda file: f"{base}/{file}", store.local_path)
              for name, entry in index["arrays"].items()}  # fmt: skip
    x: dict[str, Rows] = {s: arrays[f"x_{s}"] for s in SPLITS}
    if index.get("pixel_mean"):
        x = {s: Normalized(a, index["pixel_mean"], index["pixel_std"]) for s, a in x.items()}  # type: ignore[arg-type]
    y: dict[str, Rows] = {s: arrays[f"y_{s}"] for s in SPLITS if f"y_{s}" in arrays}
    return x, y
