"""The evaluate stage: test-set metrics (scikit-learn for classification, perplexity for language models) on
the training's device, then batch-1 latency percentiles and serving-batch throughput measured the compress
stage's way (eager PyTorch on the CPU, `compress.measure`'s threads and calls: its fp32 row), parameter count
and serialized size.

Builds on core/training/: metrics.py (the evaluation pass), builder.py (loaders over the prepared data),
checkpoint.py (the trained weights); core/compression/measure.py (the one latency and throughput harness).
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import torch
from torch import nn

from trainflow.core.compression.measure import held_out, measure_speed
from trainflow.core.compression.variants import torch_predict
from trainflow.core.config import MeasureConfig
from trainflow.core.data.prepared import load_splits
from trainflow.core.models.lora import merged
from trainflow.core.records import EvaluateResult, TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.builder import prepared_loaders
from trainflow.core.training.checkpoint import trained_model
from trainflow.core.training.metrics import classification_metrics, eval_pass, perplexity
from trainflow.core.training.precision import autocast_context, resolve_device
from trainflow.core.training.spec import TrainingSpec

log = logging.getLogger(__name__)


def evaluate(
    spec: TrainingSpec, measure: MeasureConfig, trained: TrainResult, store: ArtifactStore, store_key: str
) -> EvaluateResult:
    """Evaluate the trained weights on the test split (never seen by training or model selection). A LoRA model's
    metrics are those of the model as trained (adapters unmerged); its speed and size those of the merged model
    that compress and publish get."""
    data, device = spec.data, resolve_device(spec.train.device)
    model = trained_model(spec, store, trained.checkpoint_uri, merge=False)
    batch = spec.train.batch_size if isinstance(spec.train.batch_size, int) else trained.micro_batch_size or 64
    loaders = prepared_loaders(spec, store, batch)
    task = data.spec.task
    result = eval_pass(model.to(device), loaders.test, device, autocast_context(device, spec.train.precision),
                       collect=task == "classification")  # fmt: skip
    plots: list[str] = []
    if task == "classification":
        metrics = classification_metrics(result.targets, result.predictions, result.loss)
        png = _confusion_matrix_png(result.targets, result.predictions, data.spec.class_names)
        plots.append(store.put_bytes(png, f"{store_key}/confusion_matrix.png"))
    else:
        bits_per_byte = result.loss / math.log(2)
        metrics = {"loss": result.loss, "perplexity": perplexity(result.loss), "bits_per_byte": bits_per_byte}

    model = merged(model).to("cpu")  # the compress stage's fp32 row: eager PyTorch on the CPU
    test = held_out(load_splits(store, data), task, data.spec.seq_len)
    speed = measure_speed({"fp32": torch_predict(model)}, test.x, measure)["fp32"]
    log.info("evaluate: %s; latency p50 %.2f ms", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
             speed.latency_ms_p50)  # fmt: skip
    return EvaluateResult(
        metrics=metrics,
        n_test=data.n_test,
        latency_ms_p50=speed.latency_ms_p50,
        latency_ms_p95=speed.latency_ms_p95,
        throughput_per_s=speed.throughput,
        n_parameters=sum(p.numel() for p in model.parameters()),
        size_bytes=_serialized_size(model),
        plot_uris=plots,
    )


def _confusion_matrix_png(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = list(range(len(class_names)))
    figure, axes = plt.subplots(figsize=(1.6 + 0.5 * len(labels), 1.2 + 0.5 * len(labels)))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=labels, display_labels=class_names, ax=axes, colorbar=False
    )
    axes.set_title("test confusion matrix")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _serialized_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
