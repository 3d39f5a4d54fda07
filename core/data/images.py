"""An image folder decoded once: every file through the serving rule (`trainflow_images.square_image`) into
uint8 (N, C, H, W), on every core, cached in the store under the listing's identity, then split and normalised.

Bad files (unreadable, truncated, not an image, a label not among the classes, an empty class folder) stop the
preflight with a line naming the first, nothing written; with `data.skip_bad_files` they are left out and
counted in the record and the report."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from trainflow.core.config import ImageFolderDataConfig
from trainflow.core.data.folders import Entry, Listing, bad_files_error, listing_of
from trainflow.core.data.prepared import SPLITS, ArraySplits
from trainflow.core.errors import DataError
from trainflow.core.serving.trainflow_images import normalized, square_image
from trainflow.core.storage.store import ArtifactStore

log = logging.getLogger(__name__)

IMAGES_FORMAT = "trainflow-images/1"
N_EXAMPLES = 5  # raw test images kept with the preprocessor: the served model's input example


@dataclass(frozen=True)
class RawImages:
    name: str  # the folder or index file, for messages
    pixels: np.ndarray  # uint8 (N, C, H, W), every image at data.image_size
    target: pd.Series  # class name per image
    classes: list[str]
    files: list[str]  # relative paths, in the pixels' order
    content_sha256: str  # of every kept file's bytes, path and label
    skipped: list[tuple[str, str]]  # (file, why) left out under data.skip_bad_files


def decoded_images(cfg: ImageFolderDataConfig, store: ArtifactStore | None = None) -> RawImages:
    """The folder's images, decoded once per listing: from this process's memory, the store's cache, or by
    decoding every file (in threads: Pillow releases the GIL while it decodes and resizes).

    Raises:
        DataError: the first bad file, naming it (unless data.skip_bad_files), or too little left to train on.
    """
    listing = listing_of(cfg)
    key = hashlib.sha256(f"{listing.version()}:{cfg.image_size}:{cfg.color}".encode()).hexdigest()[:16]
    if key in _DECODED:
        return _checked(_DECODED[key], cfg)
    folder = f"images/{key}"
    raw = _read_cache(store, folder, listing) if store is not None else None
    if raw is None:
        raw = _decode_all(listing, cfg)
        _checked(raw, cfg)  # nothing is written for a folder with bad files
        if store is not None:
            _write_cache(store, folder, raw)
    _DECODED.clear()  # one folder's pixels in memory at a time
    _DECODED[key] = raw
    return _checked(raw, cfg)


_DECODED: dict[str, RawImages] = {}


def _checked(raw: RawImages, cfg: ImageFolderDataConfig) -> RawImages:
    if raw.skipped and not cfg.skip_bad_files:
        raise bad_files_error(raw.skipped)
    if len(raw.target) == 0:
        raise DataError(f"{raw.name}: no readable image")
    return raw


def _decode_one(listing: Listing, entry: Entry, size: int, color: str) -> tuple[np.ndarray | None, str, str]:
    """(pixels or None, sha256 of the file, why it is bad or '')."""
    path = listing.root / entry.path
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, "", f"cannot be read ({exc.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return None, digest, "empty file"
    try:
        return square_image(data, size, color), digest, ""
    except ValueError as exc:
        return None, digest, str(exc)


def _decode_all(listing: Listing, cfg: ImageFolderDataConfig) -> RawImages:
    entries, started = listing.entries, time.perf_counter()
    workers = max(1, os.cpu_count() or 1)
    log.info("decoding %d images from %s on %d threads", len(entries), listing.root, workers)
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda e: _decode_one(listing, e, cfg.image_size, cfg.color), entries)
        decoded = list(tqdm(results, total=len(entries), unit="img", desc="decoding", disable=not sys.stderr.isatty()))
    skipped = list(listing.problems)
    kept: list[tuple[Entry, np.ndarray, str]] = []
    for entry, (pixels, digest, why) in zip(entries, decoded, strict=True):
        if pixels is None:
            skipped.append((str(listing.root / entry.path), why))
        else:
            kept.append((entry, pixels, digest))
    labels = [e.label or "" for e, _, _ in kept]
    classes = [c for c in listing.classes if c in set(labels)]  # a class with no readable image is left out
    content = hashlib.sha256()
    for entry, _, digest in kept:
        content.update(f"{entry.path}\t{entry.label}\t{digest}\n".encode())
    channels = 3 if cfg.color == "rgb" else 1
    pixels = (
        np.stack([p for _, p, _ in kept]) if kept else np.zeros((0, channels, cfg.image_size, cfg.image_size), np.uint8)
    )
    log.info("decoded %d images in %.1f s (%d bad)", len(kept), time.perf_counter() - started, len(skipped))
    return RawImages(str(listing.root), pixels, pd.Series(labels, dtype=object), classes, [e.path for e, _, _ in kept],
                     content.hexdigest(), skipped)  # fmt: skip


def _write_cache(store: ArtifactStore, folder: str, raw: RawImages) -> None:
    buffer = io.BytesIO()
    np.save(buffer, raw.pixels, allow_pickle=False)
    store.put_bytes(buffer.getvalue(), f"{folder}/pixels.npy")
    meta = {"format": IMAGES_FORMAT, "name": raw.name, "labels": raw.target.tolist(), "classes": raw.classes,
            "files": raw.files, "content_sha256": raw.content_sha256, "skipped": raw.skipped}  # fmt: skip
    store.put_bytes(json.dumps(meta).encode(), f"{folder}/images.json")  # written last: the cache is complete


def _read_cache(store: ArtifactStore, folder: str, listing: Listing) -> RawImages | None:
    meta_uri, pixels_uri = store.uri_for(f"{folder}/images.json"), store.uri_for(f"{folder}/pixels.npy")
    if not (store.exists(meta_uri) and store.exists(pixels_uri)):
        return None
    meta = json.loads(store.local_path(meta_uri).read_text(encoding="utf-8"))
    if meta.get("format") != IMAGES_FORMAT:
        return None
    pixels = np.load(store.local_path(pixels_uri), allow_pickle=False)
    log.info("images of %s already decoded (%d)", listing.root, len(pixels))
    return RawImages(meta["name"], pixels, pd.Series(meta["labels"], dtype=object), meta["classes"], meta["files"],
                     meta["content_sha256"], [tuple(s) for s in meta["skipped"]])  # fmt: skip


@dataclass(frozen=True)
class FittedImages:
    """`split_images`' arrays and what a served model needs to redo the preprocessing on raw images."""

    splits: ArraySplits
    payload: dict[str, Any]  # the preprocessor pickle's content
    raw_test: np.ndarray  # uint8 (N, H, W, C): the test images as a user would send them

    def preprocessor_bytes(self) -> bytes:
        return pickle.dumps(self.payload, protocol=pickle.HIGHEST_PROTOCOL)

    def raw_test_bytes(self) -> bytes:
        labels = [self.splits.class_names[i] for i in self.splits.y["test"]]
        return pickle.dumps({"features": self.raw_test, "labels": labels}, protocol=pickle.HIGHEST_PROTOCOL)


def split_images(
    raw: RawImages, cfg: ImageFolderDataConfig, seed: int, rows: dict[str, np.ndarray], labels: np.ndarray,
    fitted: dict[str, Any] | None = None,
) -> FittedImages:  # fmt: skip
    """Normalised float32 splits of `rows` (split name -> image indices): per-channel mean and std of the training
    pixels, or the parent's (`fitted`, a warm start's preprocessor: its weights learned that scaling)."""
    from trainflow.core.data.preprocess import PREPROCESSOR_FORMAT

    if fitted is None:
        train = raw.pixels[rows["train"]].astype(np.float64) / 255.0
        mean = train.mean(axis=(0, 2, 3)).tolist()
        std = np.maximum(train.std(axis=(0, 2, 3)), 1e-3).tolist()
    else:
        if fitted.get("kind") != "image_file" or (fitted["image_size"], fitted["color"]) != (cfg.image_size, cfg.color):
            raise DataError(f"{raw.name}: the parent model's preprocessing is not for {cfg.image_size}px {cfg.color} "
                            "images; set data.refit_preprocessing: true")  # fmt: skip
        mean, std = fitted["pixel_mean"], fitted["pixel_std"]
    x = {s: normalized(raw.pixels[rows[s]], mean, std) for s in SPLITS}
    y = {s: labels[rows[s]] for s in SPLITS}
    hwc = raw.pixels[rows["test"]].transpose(0, 2, 3, 1)
    payload = {
        "format": PREPROCESSOR_FORMAT,
        "kind": "image_file",
        "image_size": cfg.image_size,
        "color": cfg.color,
        "pixel_mean": [float(v) for v in mean],
        "pixel_std": [float(v) for v in std],
        "class_names": raw.classes,
        "image_shape": list(raw.pixels.shape[1:]),
        "columns": None,
        "examples": np.ascontiguousarray(hwc[:N_EXAMPLES]),
    }
    return FittedImages(ArraySplits(x, y, raw.classes, int(np.prod(raw.pixels.shape[1:]))), payload,
                        np.ascontiguousarray(hwc))  # fmt: skip
