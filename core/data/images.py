"""An image folder decoded once: every file through the serving rule (`trainflow_images.square_image`) into
uint8 (N, C, H, W), on every core, straight into shards in the store (`images/<listing>/`; never the whole folder in
memory), then split and normalised: in memory for small data, or as uint8 split shards normalised on every read.

Bad files (unreadable, truncated, not an image, a label not among the classes, an empty class folder) stop the
preflight with a line naming the first, nothing written; with `data.skip_bad_files` they are left out and
counted in the record and the report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainflow.core.config import ImageFolderDataConfig
from trainflow.core.data.folders import Entry, Listing, bad_files_error, listing_of
from trainflow.core.data.prepared import SPLITS, ArraySplits, Layout, Rows
from trainflow.core.data.shards import CHUNK_BYTES, LazyRows, Selected, ShardedArray, ShardWriter
from trainflow.core.errors import DataError
from trainflow.core.serving.trainflow_images import normalized, square_image
from trainflow.core.storage.store import ArtifactStore, LocalStore

log = logging.getLogger(__name__)

IMAGES_FORMAT = "trainflow-images/2"  # 2: pixels as shards
N_EXAMPLES = 5  # raw test images kept with the preprocessor: the served model's input example
RAW_TEST_MAX = 5000  # sharded data: raw test images kept for scoring the champion (a seeded random sample)
DECODE_BATCH = 512  # files in flight at once: decoding holds no more than these


@dataclass(frozen=True)
class RawImages:
    name: str  # the folder or index file, for messages
    pixels: LazyRows  # uint8 (N, C, H, W), every image at data.image_size, read from the shards on demand
    target: pd.Series  # class name per image
    classes: list[str]
    files: list[str]  # relative paths, in the pixels' order
    content_sha256: str  # of every kept file's bytes, path and label
    skipped: list[tuple[str, str]]  # (file, why) left out under data.skip_bad_files


def decoded_images(cfg: ImageFolderDataConfig, store: ArtifactStore) -> RawImages:
    """The folder's images, decoded once per listing: from this process's memory, the store's cache, or by
    decoding every file (in threads: Pillow releases the GIL while it decodes and resizes) into shards.

    Raises:
        DataError: the first bad file, naming it (unless data.skip_bad_files), or too little left to train on.
    """
    listing = listing_of(cfg)
    key = hashlib.sha256(f"{listing.version()}:{cfg.image_size}:{cfg.color}".encode()).hexdigest()[:16]
    if key in _DECODED:
        return _checked(_DECODED[key], cfg)
    folder = f"images/{key}"
    raw = _read_cache(store, folder, listing)
    if raw is None:
        created = _missing_folders(store, folder)
        workdir = store.workdir(folder)
        raw, pixels = _decode_all(listing, cfg, workdir, int(cfg.shard_mb * (1 << 20)))
        try:
            _checked(raw, cfg)
        except DataError:
            shutil.rmtree(workdir, ignore_errors=True)  # nothing is kept for a folder with bad files
            for path in created:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        _write_cache(store, folder, workdir, raw, pixels)
    _DECODED.clear()  # one folder's pixels in memory at a time
    _DECODED[key] = raw
    return _checked(raw, cfg)


_DECODED: dict[str, RawImages] = {}


def _missing_folders(store: ArtifactStore, folder: str) -> list[Path]:
    """The folders of a local store that `store.workdir(folder)` will create, deepest first."""
    if not isinstance(store, LocalStore):
        return []  # an s3:// store's workdir is its cache
    path = store.local_path(store.uri_for(folder))
    return [p for p in (path, *path.parents) if not p.exists()]


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


def _decode_all(
    listing: Listing, cfg: ImageFolderDataConfig, workdir: Path, shard_bytes: int
) -> tuple[RawImages, dict[str, Any]]:
    """Every file decoded in order, `DECODE_BATCH` at a time, each kept image appended to the pixel shards in
    `workdir`; the images (their pixels read from there) and the shards' index entry."""
    entries, started = listing.entries, time.perf_counter()
    workers = max(1, os.cpu_count() or 1)
    log.info("decoding %d images from %s on %d threads", len(entries), listing.root, workers)
    from tqdm.auto import tqdm

    channels = 3 if cfg.color == "rgb" else 1
    writer = ShardWriter(workdir, "pixels", (channels, cfg.image_size, cfg.image_size), np.uint8, shard_bytes)
    skipped, kept, content = list(listing.problems), [], hashlib.sha256()
    progress = tqdm(total=len(entries), unit="img", desc="decoding", disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(workers) as pool, progress:
        for start in range(0, len(entries), DECODE_BATCH):
            batch = entries[start : start + DECODE_BATCH]
            for entry, (pixels, digest, why) in zip(
                batch, pool.map(lambda e: _decode_one(listing, e, cfg.image_size, cfg.color), batch), strict=True
            ):
                if pixels is None:
                    skipped.append((str(listing.root / entry.path), why))
                    continue
                writer.append(pixels[None])
                kept.append(entry)
                content.update(f"{entry.path}\t{entry.label}\t{digest}\n".encode())
            progress.update(len(batch))
    index = writer.close()
    labels = [e.label or "" for e in kept]
    classes = [c for c in listing.classes if c in set(labels)]  # a class with no readable image is left out
    log.info("decoded %d images in %.1f s (%d bad)", len(kept), time.perf_counter() - started, len(skipped))
    pixels = ShardedArray(index, lambda file: str(workdir / file), Path)
    raw = RawImages(str(listing.root), pixels, pd.Series(labels, dtype=object), classes, [e.path for e in kept],
                    content.hexdigest(), skipped)  # fmt: skip
    return raw, index


def _write_cache(store: ArtifactStore, folder: str, workdir: Path, raw: RawImages, index: dict[str, Any]) -> None:
    for shard in index["shards"]:
        store.put_file(workdir / shard["file"], f"{folder}/{shard['file']}")
    meta = {"format": IMAGES_FORMAT, "name": raw.name, "labels": raw.target.tolist(), "classes": raw.classes,
            "files": raw.files, "content_sha256": raw.content_sha256, "skipped": raw.skipped,
            "pixels": index}  # fmt: skip
    store.put_bytes(json.dumps(meta).encode(), f"{folder}/images.json")  # written last: the cache is complete


def _read_cache(store: ArtifactStore, folder: str, listing: Listing) -> RawImages | None:
    meta_uri = store.uri_for(f"{folder}/images.json")
    if not store.exists(meta_uri):
        return None
    meta = json.loads(store.local_path(meta_uri).read_text(encoding="utf-8"))
    if meta.get("format") != IMAGES_FORMAT:
        return None
    pixels = ShardedArray(meta["pixels"], lambda file: store.uri_for(f"{folder}/{file}"), store.local_path)
    log.info("images of %s already decoded (%d)", listing.root, len(pixels))
    return RawImages(meta["name"], pixels, pd.Series(meta["labels"], dtype=object), meta["classes"], meta["files"],
                     meta["content_sha256"], [tuple(s) for s in meta["skipped"]])  # fmt: skip


def pixel_stats(pixels: LazyRows | np.ndarray, rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the [0, 1] pixels of `rows`, from exact integer sums read a chunk at a time:
    the same figures whatever the chunking, so in-memory and sharded preparations normalise identically."""
    channels, height, width = pixels.shape[1:]
    total, squares = np.zeros(channels, np.int64), np.zeros(channels, np.int64)
    per_chunk = max(1, CHUNK_BYTES // (channels * height * width))
    ordered = np.sort(np.asarray(rows, dtype=np.int64))
    for start in range(0, len(ordered), per_chunk):
        chunk = np.asarray(pixels[ordered[start : start + per_chunk]])
        total += chunk.sum(axis=(0, 2, 3), dtype=np.int64)
        squares += np.square(chunk, dtype=np.uint16).sum(axis=(0, 2, 3), dtype=np.int64)
    count = max(1, len(ordered) * height * width)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0)) / 255.0
    return (mean / 255.0).tolist(), np.maximum(std, 1e-3).tolist()


@dataclass(frozen=True)
class FittedImages:
    """`split_images`' arrays and what a served model needs to redo the preprocessing on raw images."""

    splits: ArraySplits  # float32 in memory; for shards, uint8 pixels to normalise with `pixels` on every read
    payload: dict[str, Any]  # the preprocessor pickle's content
    raw_test: np.ndarray  # uint8 (N, H, W, C): the (first RAW_TEST_MAX, sharded) test images as a user sends them

    @property
    def pixels(self) -> tuple[list[float], list[float]]:
        return self.payload["pixel_mean"], self.payload["pixel_std"]

    def preprocessor_bytes(self) -> bytes:
        return pickle.dumps(self.payload, protocol=pickle.HIGHEST_PROTOCOL)

    def raw_test_bytes(self) -> bytes:
        labels = [self.splits.class_names[i] for i in np.asarray(self.splits.y["test"][: len(self.raw_test)])]
        return pickle.dumps({"features": self.raw_test, "labels": labels}, protocol=pickle.HIGHEST_PROTOCOL)


def split_images(
    raw: RawImages, cfg: ImageFolderDataConfig, seed: int, rows: dict[str, np.ndarray], labels: np.ndarray,
    fitted: dict[str, Any] | None = None, layout: Layout = "memory",
) -> FittedImages:  # fmt: skip
    """The splits of `rows` (split name -> image indices), normalised with the per-channel mean and std of the
    training pixels, or the parent's (`fitted`, a warm start's preprocessor: its weights learned that scaling):
    float32 arrays in memory, or (`layout` shards) lazy uint8 rows that `write_splits` streams into shards."""
    from trainflow.core.data.preprocess import PREPROCESSOR_FORMAT

    if fitted is None:
        mean, std = pixel_stats(raw.pixels, rows["train"])
    else:
        if fitted.get("kind") != "image_file" or (fitted["image_size"], fitted["color"]) != (cfg.image_size, cfg.color):
            raise DataError(f"{raw.name}: the parent model's preprocessing is not for {cfg.image_size}px {cfg.color} "
                            "images; set data.refit_preprocessing: true")  # fmt: skip
        mean, std = fitted["pixel_mean"], fitted["pixel_std"]
    x: dict[str, Rows] = {
        s: normalized(raw.pixels[rows[s]], mean, std) if layout == "memory" else Selected(raw.pixels, rows[s])
        for s in SPLITS
    }
    y: dict[str, Rows] = {s: labels[rows[s]] for s in SPLITS}
    test_rows = rows["test"] if layout == "memory" else rows["test"][:RAW_TEST_MAX]
    hwc = np.asarray(raw.pixels[test_rows]).transpose(0, 2, 3, 1)
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
