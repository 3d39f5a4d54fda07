"""The prepare_data stage: load a source, split it (stratified, seeded), preprocess it with
transformers fitted on train only, and cache the arrays in the store under a content fingerprint,
so a second run with the same data and settings skips the work.

Builds on core/data/: sources.py (reading), preprocess.py (split, impute, encode, scale),
prepared.py (the stored .npz), spec.py (what the models are told).

Beside splits.npz, a table or image source also gets `preprocessor.pkl`: the fitted transformer, the raw
columns and their dtypes, class names, image shape and a few raw test rows, so a served model can take raw
inputs (see core/serving/).
"""

from __future__ import annotations

import hashlib
import json
import logging

from trainflow.core.config import DataConfig, StoreConfig, TextDataConfig
from trainflow.core.data.prepared import SPLITS, splits_to_npz
from trainflow.core.data.preprocess import split_table, split_text
from trainflow.core.data.sources import RawText, dataset_uri, load_source
from trainflow.core.data.spec import DataSpec
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore

log = logging.getLogger(__name__)

PREPARE_VERSION = 2  # bump when the preprocessing changes what it writes (2: preprocessor.pkl)


def prepare_data(cfg: DataConfig, seed: int, store: ArtifactStore, s3: StoreConfig | None = None) -> PrepareDataResult:
    """Prepare the train/val/test arrays for `cfg`, re-using the store's copy when the fingerprint matches.
    `s3`: S3 settings for an s3:// `data.path` (the `store` section; default: an S3 store's own).

    Raises:
        DataError: the source is missing, empty or cannot be encoded (the message names file and column).
    """
    raw = load_source(cfg, seed, s3 if s3 is not None else getattr(store, "settings", None))
    settings = cfg.model_dump(mode="json", exclude={"loader"})
    split_seed = None if isinstance(raw, RawText) else seed  # text splits are contiguous: no seed involved
    identity = {"content": raw.content_sha256, "settings": settings, "seed": split_seed, "version": PREPARE_VERSION}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    folder = f"data/{fingerprint[:16]}"
    record_uri = store.uri_for(f"{folder}/record.json")
    if store.exists(record_uri):
        result = PrepareDataResult.model_validate_json(store.local_path(record_uri).read_text())
        complete = isinstance(raw, RawText) or result.preprocessor_uri is not None  # a table ships its preprocessing
        if complete and all(store.exists(uri) for uri in result.artifact_uris()):
            log.info("prepare_data: %s already prepared (fingerprint %s)", raw.name, fingerprint[:12])
            return result

    preprocessor_uri = None
    if isinstance(raw, RawText):
        assert isinstance(cfg, TextDataConfig)
        splits = split_text(raw, cfg.val_fraction, cfg.test_fraction, cfg.seq_len)
        counts = [(len(splits.x[s]) - 1) // cfg.seq_len for s in SPLITS]
        spec = DataSpec(task="language_modeling", input_shape=(cfg.seq_len,), n_classes=256)
    else:
        fitted = split_table(raw, cfg.val_fraction, cfg.test_fraction, cfg.scale, seed)
        splits = fitted.splits
        preprocessor_uri = store.put_bytes(fitted.preprocessor_bytes(), f"{folder}/preprocessor.pkl")
        counts = [len(splits.y[s]) for s in SPLITS]
        spec = DataSpec(
            task="classification",
            input_shape=tuple(splits.x["train"].shape[1:]),
            n_classes=len(splits.class_names),
            class_names=splits.class_names,
        )
    uri = store.put_bytes(splits_to_npz(splits), f"{folder}/splits.npz")
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
    )
    store.put_bytes(result.model_dump_json(indent=2).encode(), f"{folder}/record.json")
    log.info("prepare_data: %s -> %d/%d/%d train/val/test", raw.name, *counts)
    return result
