"""The prepare_data stage: load a source, split it (stratified, seeded), preprocess it with
transformers fitted on train only, and cache the arrays in the store under a content fingerprint,
so a second run with the same data and settings skips the work.

Builds on core/data/: sources.py (reading), preprocess.py (split, impute, encode, scale),
prepared.py (the stored .npz, or shards above data.in_memory_max_mb: shards.py), spec.py (what the models are told).

Beside the splits, a table or image source also gets `preprocessor.pkl`: the fitted transformer, the raw
columns and their dtypes, class names, image shape and a few raw test rows, so a served model can take raw
inputs (see core/serving/); and `raw_test.pkl`, the test split as it came in, on which the publish stage scores
the champion's served model against the new version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np

from trainflow.core.config import DataConfig, ImageFolderDataConfig, StoreConfig, TextDataConfig, TextFolderDataConfig
from trainflow.core.data.images import RawImages, decoded_images, split_images
from trainflow.core.data.prepared import SPLITS, ArraySplits, layout_for, write_splits
from trainflow.core.data.preprocess import split_rows, split_table, split_text
from trainflow.core.data.sources import RawTable, RawText, dataset_uri, load_source
from trainflow.core.data.spec import DataSpec
from trainflow.core.data.text_files import RawTextFiles, load_text_files, split_text_files
from trainflow.core.errors import DataError
from trainflow.core.records import PrepareDataResult, ReusedPreprocessing
from trainflow.core.storage.files import sha256_file
from trainflow.core.storage.store import ArtifactStore

log = logging.getLogger(__name__)

PREPARE_VERSION = 5  # bump when the preprocessing changes what it writes (2: preprocessor.pkl, 3: raw_test.pkl,
# 4: image folders, the spec's numeric_features, 5: shards, pixel statistics from integer sums)
STORAGE_FIELDS = {"loader", "in_memory_max_mb", "shard_mb"}  # how the arrays are held, not what they are


def prepare_data(
    cfg: DataConfig,
    seed: int,
    store: ArtifactStore,
    s3: StoreConfig | None = None,
    preprocessing: ReusedPreprocessing | None = None,
) -> PrepareDataResult:
    """Prepare the train/val/test arrays for `cfg`, re-using the store's copy when the fingerprint matches.
    `s3`: S3 settings for an s3:// `data.path` (the `store` section; default: an S3 store's own).
    `preprocessing`: a parent model's fitted preprocessor to apply instead of fitting one (`model.init_from`);
    its sha256 is part of the fingerprint.

    Raises:
        DataError: the source is missing, empty or cannot be encoded (the message names file and column).
    """
    s3 = s3 if s3 is not None else getattr(store, "settings", None)
    raw: RawTable | RawText | RawImages | RawTextFiles
    if isinstance(cfg, ImageFolderDataConfig):
        raw = decoded_images(cfg, store)  # decoded once per listing, cached in the store
    elif isinstance(cfg, TextFolderDataConfig):
        raw = load_text_files(cfg)
    else:
        raw = load_source(cfg, seed, s3)
    settings = cfg.model_dump(mode="json", exclude=STORAGE_FIELDS)
    split_seed = None if isinstance(raw, RawText) else seed  # text splits are contiguous: no seed involved
    identity = {"content": raw.content_sha256, "settings": settings, "seed": split_seed, "version": PREPARE_VERSION}
    if preprocessing is not None and not isinstance(raw, RawText | RawTextFiles):
        identity["preprocessor"] = preprocessing.sha256
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    folder = f"data/{fingerprint[:16]}"
    record_uri = store.uri_for(f"{folder}/record.json")
    if store.exists(record_uri):
        result = PrepareDataResult.model_validate_json(store.local_path(record_uri).read_text())
        complete = (
            isinstance(raw, RawText | RawTextFiles) or result.raw_test_uri is not None
        )  # a table ships its preprocessing
        fits = result.layout == layout_for(result.nbytes, cfg.in_memory_max_mb)  # else: written again, as asked
        if complete and fits and all(store.exists(uri) for uri in result.artifact_uris()):
            log.info("prepare_data: %s already prepared (fingerprint %s)", raw.name, fingerprint[:12])
            return result

    preprocessor_uri = raw_test_uri = None
    skipped = [f"{file}: {why}" for file, why in getattr(raw, "skipped", [])]
    if isinstance(raw, RawTextFiles):
        assert isinstance(cfg, TextFolderDataConfig)
        splits, files = split_text_files(raw, cfg.val_fraction, cfg.test_fraction, cfg.seq_len, seed)
        counts = [(len(splits.x[s]) - 1) // cfg.seq_len for s in SPLITS]
        spec = DataSpec(task="language_modeling", input_shape=(cfg.seq_len,), n_classes=256)
        log.info("prepare_data: %d/%d/%d files in train/val/test", *(len(files[s]) for s in SPLITS))
    elif isinstance(raw, RawImages):
        assert isinstance(cfg, ImageFolderDataConfig)
        parent = _parent_preprocessor(preprocessing, s3)
        rows = split_rows(raw.target, raw.name, cfg.val_fraction, cfg.test_fraction, seed, raw.classes)
        nbytes = len(rows.labels) * (int(np.prod(raw.pixels.shape[1:])) * 4 + 8)  # float32 pixels, int64 label
        layout = layout_for(nbytes, cfg.in_memory_max_mb)
        images = split_images(raw, cfg, seed, rows.index, rows.labels, parent, layout)
        splits, pixels = images.splits, images.pixels if layout == "shards" else None
        preprocessor_uri = store.put_bytes(images.preprocessor_bytes(), f"{folder}/preprocessor.pkl")
        raw_test_uri = store.put_bytes(images.raw_test_bytes(), f"{folder}/raw_test.pkl")
        counts = [len(splits.y[s]) for s in SPLITS]
        spec = DataSpec(task="classification", input_shape=tuple(raw.pixels.shape[1:]), n_classes=len(raw.classes),
                        class_names=raw.classes, pixel_mean=images.payload["pixel_mean"],
                        pixel_std=images.payload["pixel_std"])  # fmt: skip
    elif isinstance(raw, RawText):
        assert isinstance(cfg, TextDataConfig)
        splits = split_text(raw, cfg.val_fraction, cfg.test_fraction, cfg.seq_len)
        counts = [(len(splits.x[s]) - 1) // cfg.seq_len for s in SPLITS]
        spec = DataSpec(task="language_modeling", input_shape=(cfg.seq_len,), n_classes=256)
    else:
        parent = _parent_preprocessor(preprocessing, s3)
        fitted = split_table(raw, cfg.val_fraction, cfg.test_fraction, cfg.scale, seed, parent)
        splits = fitted.splits
        preprocessor_uri = store.put_bytes(fitted.preprocessor_bytes(), f"{folder}/preprocessor.pkl")
        raw_test_uri = store.put_bytes(fitted.raw_test_bytes(), f"{folder}/raw_test.pkl")
        counts = [len(splits.y[s]) for s in SPLITS]
        spec = DataSpec(
            task="classification",
            input_shape=tuple(splits.x["train"].shape[1:]),
            n_classes=len(splits.class_names),
            class_names=splits.class_names,
            numeric_features=len(fitted.numeric),
        )
    if not isinstance(raw, RawImages):
        nbytes = _nbytes(splits)
        layout, pixels = layout_for(nbytes, cfg.in_memory_max_mb), None
    uri = write_splits(splits, store, folder, layout, cfg.shard_mb, pixels)
    result = PrepareDataResult(
        fingerprint=fingerprint,
        uri=uri,
        source=raw.name,
        dataset_uri=dataset_uri(cfg),
        n_train=counts[0],
        n_val=counts[1],
        n_test=counts[2],
        spec=spec,
        preprocessor_uri=preprocessor_uri,
        raw_test_uri=raw_test_uri,
        skipped_files=skipped,
        layout=layout,
        nbytes=nbytes,
    )
    store.put_bytes(result.model_dump_json(indent=2).encode(), f"{folder}/record.json")
    log.info("prepare_data: %s -> %d/%d/%d train/val/test (%s, %.1f MB)", raw.name, *counts, layout, nbytes / 2**20)
    return result


def _nbytes(splits: ArraySplits) -> int:
    return sum(int(a.nbytes) for group in (splits.x, splits.y) for a in group.values())


def _parent_preprocessor(preprocessing: ReusedPreprocessing | None, s3: StoreConfig | None) -> dict[str, Any] | None:
    """The parent's fitted preprocessor payload, checked against the sha256 it was resolved with."""
    if preprocessing is None:
        return None
    import pickle

    from trainflow.core.models.warm_start import fetch

    path = fetch(preprocessing.uri, s3)
    if sha256_file(path) != preprocessing.sha256:
        raise DataError(f"{preprocessing.uri}: the parent's preprocessor changed since this run resolved it")
    log.info("prepare_data: re-using the parent model's preprocessing (%s)", preprocessing.uri)
    return pickle.loads(path.read_bytes())
