"""The evaluate stage: test-set metrics (scikit-learn for classification, perplexity for language
models), batch-1 latency percentiles, throughput at the training batch size, parameter count and
serialized size.

Builds on core/training/: metrics.py (the evaluation pass), builder.py (loaders over the prepared
data), checkpoint.py (loading the trained weights).
"""

from __future__ import annotations

import io
import logging
import math
import time
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from trainflow.core.config import EvaluateConfig, LoaderConfig, ModelConfig, TrainConfig
from trainflow.core.models import build_model
from trainflow.core.records import EvaluateResult, PrepareDataResult, TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.builder import prepared_loaders
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.metrics import classification_metrics, eval_pass, perplexity
from trainflow.core.training.precision import autocast_context, resolve_device

log = logging.getLogger(__name__)


def evaluate(
    cfg: EvaluateConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    trained: TrainResult,
    store: ArtifactStore,
    store_key: str,
) -> EvaluateResult:
    """Evaluate the trained weights on the test split (never seen by training or model selection)."""
    device = resolve_device(train_cfg.device)
    autocast = autocast_context(device, train_cfg.precision)
    weights = store.local_path(trained.checkpoint_uri)
    model = build_model(model_cfg, data.spec).to(device)
    model.load_state_dict(load_checkpoint(weights)["model"])
    model.eval()
    task = data.spec.task
    batch = train_cfg.batch_size if isinstance(train_cfg.batch_size, int) else trained.micro_batch_size or 64
    loaders = prepared_loaders(data, store, batch, loader_cfg, seed)

    result = eval_pass(model, loaders.test, device, autocast, collect=task == "classification")
    plots: list[str] = []
    if task == "classification":
        metrics = classification_metrics(result.targets, result.predictions, result.loss)
        png = _confusion_matrix_png(result.targets, result.predictions, data.spec.class_names)
        plots.append(store.put_bytes(png, f"{store_key}/confusion_matrix.png"))
    else:
        metrics = {
            "loss": result.loss,
            "perplexity": perplexity(result.loss),
            "bits_per_byte": result.loss / math.log(2),
        }

    sample, _ = next(iter(loaders.test))
    latencies = _latencies_ms(model, sample[:1].to(device), autocast, device, cfg.latency_warmup, cfg.latency_iters)
    throughput = _throughput(model, sample.to(device), autocast, device, cfg.throughput_batches)
    log.info("evaluate: %s; latency p50 %.2f ms", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), latencies[0])
    return EvaluateResult(
        metrics=metrics,
        n_test=data.n_test,
        latency_ms_p50=latencies[0],
        latency_ms_p95=latencies[1],
        throughput_per_s=throughput,
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


@torch.inference_mode()
def _latencies_ms(
    model: nn.Module,
    x: torch.Tensor,
    autocast: AbstractContextManager[object],
    device: torch.device,
    warmup: int,
    iters: int,
) -> tuple[float, float]:
    """p50 and p95 of single-sample forward passes, each timed to completion."""
    times = []
    for i in range(warmup + iters):
        started = time.perf_counter()
        with autocast:
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    return float(p50), float(p95)


@torch.inference_mode()
def _throughput(
    model: nn.Module, batch: torch.Tensor, autocast: AbstractContextManager[object], device: torch.device, calls: int
) -> float:
    with autocast:
        model(batch)  # warm-up
    started = time.perf_counter()
    for _ in range(calls):
        with autocast:
            model(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls * len(batch) / (time.perf_counter() - started)


def _serialized_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
