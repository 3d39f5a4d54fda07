"""The prepared arrays (`ArraySplits`) and how they sit in the store: one .npz per fingerprint, read once per
process. Free of scikit-learn and pandas, so HPO workers and the training loop do not load them."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainflow.core.data.spec import DataSpec


@dataclass(frozen=True)
class ArraySplits:
    """Model-ready arrays: features float32 shaped like the model input, labels int64 (or byte tokens)."""

    x: dict[str, np.ndarray]  # split name -> features, or tokens for text
    y: dict[str, np.ndarray]  # split name -> labels; empty for text
    class_names: list[str]
    n_features: int


SPLITS = ("train", "val", "test")


def splits_to_npz(splits: ArraySplits) -> bytes:
    """`x_train, y_train, x_val, ...` (no `y_*` for text) in one uncompressed .npz."""
    arrays = {f"x_{s}": a for s, a in splits.x.items()} | {f"y_{s}": a for s, a in splits.y.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_splits(path: Path, spec: DataSpec) -> ArraySplits:
    """The arrays of a prepared .npz. The LR range test, HPO trials, training, evaluation and publishing
    all ask for them, so they are read once per process (keyed by path and mtime); do not modify them."""
    x, y = _read_npz(str(path), path.stat().st_mtime_ns)
    return ArraySplits(x, y, spec.class_names, int(np.prod(spec.input_shape)))


@functools.lru_cache(maxsize=2)
def _read_npz(path: str, mtime_ns: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path) as npz:
        x = {s: npz[f"x_{s}"] for s in SPLITS}
        y = {s: npz[f"y_{s}"] for s in SPLITS if f"y_{s}" in npz}
    return x, y
