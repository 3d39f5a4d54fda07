"""The data of `augmentation.py`: sklearn's digits written out as an image folder of PNGs, prepared by trainflow's
own prepare_data stage (`data.source: image_folder`), and a stratified share of a prepared training split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from trainflow.core.config import ImageFolderDataConfig
from trainflow.core.data.prepared import ArraySplits, load_splits, splits_to_npz
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import LocalStore


def write_digits_folder(root: Path, size: int) -> Path:
    """sklearn's 1,797 digits (8 x 8, values 0-16) as size x size grey PNGs (bicubic upscaling), one sub-folder per
    class; written once."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = root / f"digits{size}"
    if (folder / ".complete").exists():
        return folder
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray(np.uint8(np.round(image * 255 / 16)), mode="L")
        pixels.resize((size, size), Image.Resampling.BICUBIC).save(folder / str(label) / f"{i:04d}.png")
    (folder / ".complete").touch()
    return folder


def prepared_folder(folder: Path, size: int, color: str, seed: int, store: LocalStore) -> PrepareDataResult:
    """The folder through the prepare_data stage: decoded at `size`, split 70/15/15 (stratified, by `seed`),
    normalised per channel."""
    cfg = ImageFolderDataConfig(source="image_folder", path=str(folder), image_size=size, color=color)
    return prepare_data(cfg, seed, store)


def train_share(data: PrepareDataResult, share: float, seed: int, store: LocalStore) -> PrepareDataResult:
    """`data` with only `share` of its training split, the same share of every class (seeded); validation and test
    kept whole. A new prepared .npz and its record, as prepare_data writes them."""
    arrays = load_splits(store, data)
    rng = np.random.default_rng(seed)
    y = arrays.y["train"]
    keep = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(y == c), max(1, round(share * int((y == c).sum()))), replace=False)
        for c in np.unique(y)
    ]))  # fmt: skip
    x_splits = dict(arrays.x) | {"train": arrays.x["train"][keep]}
    y_splits = dict(arrays.y) | {"train": y[keep]}
    subset = ArraySplits(x_splits, y_splits, arrays.class_names, arrays.n_features)
    payload = splits_to_npz(subset)
    fingerprint = hashlib.sha256(payload + data.spec.model_dump_json().encode()).hexdigest()
    uri = store.put_bytes(payload, f"data/share-{fingerprint[:16]}/splits.npz")
    return data.model_copy(update={"fingerprint": fingerprint, "uri": uri, "n_train": len(keep),
                                   "source": f"{data.source} ({share:.0%} of the training split)"})  # fmt: skip
