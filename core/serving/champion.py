"""Score a registered version's served model on another version's raw test split: how the publish stage puts the
champion and a new version on the same data in the same run, whatever data the champion was trained on.

The served model is loaded as MLflow serves it (`mlflow.pyfunc.load_model`: its own preprocessing, its own
runtime, int8 ONNX for the digits demo) and given the raw test rows prepare_data kept (`raw_test.pkl`); a
language model's served program is run on the test bytes, window by window, for its perplexity.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np

from trainflow.core.data.prepared import load_splits
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.tracking.backend import fluent_tracking_uri
from trainflow.core.training.metrics import classification_metrics

MAX_WINDOWS = 512  # a language model is scored on at most this many test windows (seconds, not minutes)


def served_scores(model_uri: str, data: PrepareDataResult, store: ArtifactStore, tracking_uri: str) -> dict[str, float]:
    """The test metrics of the served model at `model_uri` on `data`'s test split (the evaluate stage's names).

    Raises:
        ValueError: the data kept no raw test split (prepared before it was kept), or the model cannot take it.
    """
    import mlflow.pyfunc

    with fluent_tracking_uri(tracking_uri):
        served = mlflow.pyfunc.load_model(model_uri)
    if data.spec.task == "language_modeling":
        return _language_model_scores(served.unwrap_python_model(), data, store)
    if data.raw_test_uri is None:
        raise ValueError(f"{data.uri}: prepared without its raw test split; prepare the data again")
    raw: dict[str, Any] = pickle.loads(store.local_path(data.raw_test_uri).read_bytes())
    out = served.predict(raw["features"])
    labels = np.asarray(raw["labels"], dtype=object)
    names = sorted(set(labels) | set(out["label"]))
    index = {name: i for i, name in enumerate(names)}
    truth = np.array([index[x] for x in labels])
    predicted = np.array([index[x] for x in out["label"]])
    probas = np.array([out[f"proba_{x}"].iloc[i] if f"proba_{x}" in out else 0.0 for i, x in enumerate(labels)])
    loss = float(-np.mean(np.log(np.clip(probas.astype(np.float64), 1e-12, 1.0))))
    return classification_metrics(truth, predicted, loss)


def _language_model_scores(model: Any, data: PrepareDataResult, store: ArtifactStore) -> dict[str, float]:
    """Next-byte cross-entropy of the served program over non-overlapping test windows of its block size."""
    test = load_splits(store, data).x["test"]
    length = int(model.meta.get("fixed_length") or model.meta["seq_len"])
    count = min((len(test) - 1) // length, MAX_WINDOWS)
    tokens = np.asarray(test[: count * length + 1]).astype(np.int64)  # only the windows scored
    if count < 1:
        raise ValueError(f"{data.uri}: the test split is shorter than the served model's block size {length}")
    x = np.stack([tokens[i * length : (i + 1) * length] for i in range(count)])
    y = np.stack([tokens[i * length + 1 : (i + 1) * length + 1] for i in range(count)])
    total = 0.0
    for start in range(0, count, 32):
        logits = model.runner(x[start : start + 32]).astype(np.float64)  # (B, T, vocab)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        target = y[start : start + 32]
        total -= np.take_along_axis(log_probs, target[..., None], axis=-1).sum()
    loss = total / y.size
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": loss / math.log(2)}
