"""The prepare_data stage: load a source, split it (stratified, seeded), preprocess it with
transformers fitted on train only, and cache the arrays in the store under a content fingerprint,
so a second run with the same data and settings skips the work.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from core.config import DataConfig, TextDataConfig
from core.data.preprocess import SPLITS, ArraySplits, split_table, split_text
from core.data.sources import RawText, load_source
from core.records import StageResult
from core.store import ArtifactStore

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the preprocessing changes what it writes


class DataSpec(BaseModel):
    """What a model needs to know about the data."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task: Literal["classification", "language_modeling"]
    input_shape: tuple[int, ...]  # one sample: (features,), (C, H, W) or (seq_len,)
    n_classes: int  # classes, or the vocabulary size for language modelling
    class_names: list[str] = []


class PrepareDataResult(StageResult):
    fingerprint: str
    uri: str  # .npz with x_train, y_train, x_val, ... (tokens only for text)
    source: str
    n_train: int  # samples, or seq_len windows for text
    n_val: int
    n_test: int
    spec: DataSpec

    def artifact_uris(self) -> list[str]:
        return [self.uri]

    def run_tags(self) -> dict[str, str]:
        return {"trainflow.data_fingerprint": self.fingerprint}


def prepare_data(cfg: DataConfig, seed: int, store: ArtifactStore) -> PrepareDataResult:
    """Prepare the train/val/test arrays for `cfg`, re-using the store's copy when the fingerprint matches.

    Raises:
        DataError: the source is missing, empty or cannot be encoded (the message names file and column).
    """
    raw = load_source(cfg, seed)
    settings = cfg.model_dump(mode="json", exclude={"loader"})
    split_seed = None if isinstance(raw, RawText) else seed  # text splits are contiguous: no seed involved
    identity = {"content": raw.content_sha256, "settings": settings, "seed": split_seed, "version": PREPARE_VERSION}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    folder = f"data/{fingerprint[:16]}"
    record_uri = store.workdir(folder).joinpath("record.json").as_uri()
    if store.exists(record_uri):
        result = PrepareDataResult.model_validate_json(store.local_path(record_uri).read_text())
        if store.exists(result.uri):
            log.info("prepare_data: %s already prepared (fingerprint %s)", raw.name, fingerprint[:12])
            return result

    if isinstance(raw, RawText):
        assert isinstance(cfg, TextDataConfig)
        splits = split_text(raw, cfg.val_fraction, cfg.test_fraction, cfg.seq_len)
        counts = [(len(splits.x[s]) - 1) // cfg.seq_len for s in SPLITS]
        spec = DataSpec(task="language_modeling", input_shape=(cfg.seq_len,), n_classes=256)
    else:
        splits = split_table(raw, cfg.val_fraction, cfg.test_fraction, cfg.scale, seed)
        counts = [len(splits.y[s]) for s in SPLITS]
        spec = DataSpec(
            task="classification",
            input_shape=tuple(splits.x["train"].shape[1:]),
            n_classes=len(splits.class_names),
            class_names=splits.class_names,
        )
    uri = store.put_bytes(_to_npz(splits), f"{folder}/splits.npz")
    result = PrepareDataResult(
        fingerprint=fingerprint,
        uri=uri,
        source=raw.name,
        n_train=counts[0],
        n_val=counts[1],
        n_test=counts[2],
        spec=spec,
    )
    store.put_bytes(result.model_dump_json(indent=2).encode(), f"{folder}/record.json")
    log.info("prepare_data: %s -> %d/%d/%d train/val/test", raw.name, *counts)
    return result


def load_splits(result: PrepareDataResult, store: ArtifactStore) -> ArraySplits:
    """The prepared arrays, read from the store once per process (HPO trials, the range test, training,
    evaluation and publishing all ask for them). Callers must not modify them."""
    path = store.local_path(result.uri)
    x, y = _read_npz(str(path), path.stat().st_mtime_ns)
    return ArraySplits(x, y, result.spec.class_names, int(np.prod(result.spec.input_shape)))


@functools.lru_cache(maxsize=2)
def _read_npz(path: str, mtime_ns: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path) as npz:
        x = {s: npz[f"x_{s}"] for s in SPLITS}
        y = {s: npz[f"y_{s}"] for s in SPLITS if f"y_{s}" in npz}
    return x, y


def _to_npz(splits: ArraySplits) -> bytes:
    arrays = {f"x_{s}": a for s, a in splits.x.items()} | {f"y_{s}": a for s, a in splits.y.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
