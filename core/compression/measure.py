"""One evaluation for every model: test metrics, batch-1 latency, throughput at a serving batch. The evaluate
stage measures the trained model with it, the compress stage every variant (the trained model's fp32 row too).

Every variant is a `Candidate` whose `predict` maps a numpy batch of model inputs to numpy logits,
whatever runs underneath (eager PyTorch, a torch.export program, an ONNX Runtime session), so the
runtimes pay the same conversions. Latency is measured with the variants alternated in rounds in
one process, so a machine that drifts (turbo, a noisy neighbour) moves every variant alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainflow.core.config import MeasureConfig
from trainflow.core.data.prepared import ArraySplits, Rows
from trainflow.core.data.shards import LazyRows
from trainflow.core.data.spec import Task
from trainflow.core.training.metrics import classification_metrics, perplexity

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Candidate:
    """A built variant, ready to be measured and saved (`path`)."""

    name: str
    base: str
    format: str
    runtime: str  # torch | onnxruntime
    predict: Predict
    path: Path
    params: int
    sparsity: float | None = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldOut:
    """Model inputs and targets of the test split, as the models take them."""

    x: Rows  # (N, ...) features, or (N, T) int64 token windows; read a batch at a time
    y: Rows  # (N,) labels, or (N, T) next tokens
    task: Task


class Windows(LazyRows):
    """The non-overlapping `seq_len` windows of a byte-token array as int64 rows, read on demand; `shift` 1 gives
    the targets (each window moved on by one token)."""

    def __init__(self, tokens: Rows, seq_len: int, shift: int = 0):
        self.tokens, self.seq_len, self.shift = tokens, seq_len, shift
        self.shape, self.dtype = ((len(tokens) - 1) // seq_len, seq_len), np.dtype(np.int64)

    def _take(self, index: np.ndarray) -> np.ndarray:
        positions = index[:, None] * self.seq_len + self.shift + np.arange(self.seq_len)[None, :]
        return np.asarray(self.tokens[positions]).astype(np.int64)


def held_out(splits: ArraySplits, task: Task, seq_len: int | None) -> HeldOut:
    """The test split as whole inputs: the language model's tokens cut into non-overlapping windows (as the
    evaluate stage's loader does), so every variant sees the same fixed-shape batches."""
    if task == "language_modeling":
        assert seq_len is not None
        tokens = splits.x["test"]
        return HeldOut(Windows(tokens, seq_len), Windows(tokens, seq_len, shift=1), task)
    return HeldOut(splits.x["test"], splits.y["test"], task)


def task_metrics(predict: Predict, test: HeldOut, batch_size: int = 256) -> dict[str, float]:
    """The evaluate stage's metrics for `predict` on the test set (accuracy, macro precision/recall/F1, loss |
    loss, perplexity, bits per byte)."""
    total, count, targets, predictions = 0.0, 0, [], []
    for i in range(0, len(test.x), batch_size):  # a batch at a time: a large test split is never held whole
        logits = np.asarray(predict(test.x[i : i + batch_size]))
        logits = logits.astype(np.float64).reshape(-1, logits.shape[-1])
        y = np.asarray(test.y[i : i + batch_size]).reshape(-1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total, count = total - float(log_probs[np.arange(len(y)), y].sum()), count + len(y)
        if test.task == "classification":
            targets.append(y)
            predictions.append(logits.argmax(axis=1))
    loss = total / max(count, 1)
    if test.task == "language_modeling":
        return {"loss": loss, "perplexity": perplexity(loss), "bits_per_byte": loss / math.log(2)}
    return classification_metrics(np.concatenate(targets), np.concatenate(predictions), loss)


@dataclass(frozen=True)
class Speed:
    latency_ms_p50: float
    latency_ms_p95: float
    throughput: float  # samples per second at the serving batch


def measure_speed(predicts: Mapping[str, Predict], test_x: Rows, cfg: MeasureConfig) -> dict[str, Speed]:
    """Batch-1 latency percentiles and serving-batch throughput of each model on the same test inputs, with
    `cfg.threads` intra-op threads: the one harness, for the evaluate stage's trained model and every variant.

    The `cfg.latency_calls` timed batch-1 calls are split into `cfg.rounds`; within a round every model runs its
    share back to back, in an order that rotates each round. Throughput alternates the same way.
    """
    names = list(predicts)
    one, many = test_x[:1], serving_batch(test_x, cfg.serving_batch)
    with fixed_threads(cfg.threads):
        for predict in predicts.values():
            for _ in range(max(cfg.warmup, 1)):
                predict(one)
            predict(many)
        times: dict[str, list[float]] = {name: [] for name in names}
        batch_times: dict[str, list[float]] = {name: [] for name in names}
        per_round = max(1, cfg.latency_calls // cfg.rounds)
        tp_per_round = max(1, math.ceil(cfg.throughput_calls / cfg.rounds))
        for r in range(cfg.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                for _ in range(per_round):
                    started = time.perf_counter()
                    predicts[name](one)
                    times[name].append(time.perf_counter() - started)
            for name in order:
                started = time.perf_counter()
                for _ in range(tp_per_round):
                    predicts[name](many)
                batch_times[name].append((time.perf_counter() - started) / tp_per_round)
    speeds = {}
    for name, seconds in times.items():
        p50, p95 = np.percentile(np.array(seconds) * 1000, [50, 95])
        speeds[name] = Speed(float(p50), float(p95), len(many) / float(np.median(batch_times[name])))
    return speeds


def serving_batch(x: Rows, size: int) -> np.ndarray:
    """`size` test inputs, repeated when the test split is smaller (throughput needs a full batch)."""
    return np.asarray(x[np.arange(size) % len(x)])


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (ONNX Runtime sessions take theirs when built)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
