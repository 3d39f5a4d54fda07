"""The compression table's rules: which variant is recommended, and how the table shows the rest."""

from __future__ import annotations

import numpy as np
import pytest

from trainflow.core.compression.measure import HeldOut, measure_speed, task_metrics
from trainflow.core.compression.report import csv_table, markdown_table, pareto_png, recommend, table_rows
from trainflow.core.config import MeasureConfig
from trainflow.core.records import CompressedVariant


def _variant(name: str, accuracy: float, p50: float, size: int, status: str = "ok") -> CompressedVariant:
    base, _, fmt = name.partition("+")
    return CompressedVariant(
        name=name, base=base, format=fmt or "torch", runtime="onnxruntime" if "onnx" in fmt else "torch",
        status=status, reason="" if status == "ok" else "ExportError: op not supported",
        size_bytes=size if status == "ok" else None, params=1000, latency_ms_p50=p50 if status == "ok" else None,
        latency_ms_p95=p50 * 1.2 if status == "ok" else None, throughput=1e4 if status == "ok" else None,
        metrics={"accuracy": accuracy, "loss": 0.1} if status == "ok" else {},
    )  # fmt: skip


def test_the_fastest_variant_within_the_accuracy_tolerance_is_recommended() -> None:
    variants = [
        _variant("fp32", 0.950, 1.00, 400_000),
        _variant("fp32+onnx", 0.950, 0.30, 400_000),
        _variant("fp32+onnx_int8", 0.945, 0.25, 110_000),  # -0.5 points: within 1 point
        _variant("distilled+onnx_int8", 0.930, 0.10, 30_000),  # -2 points: too much
    ]
    name, reason = recommend(variants, "classification", accuracy_drop=0.01, perplexity_rise=0.02, latency_tie=0.05)
    assert name == "fp32+onnx_int8"
    assert "4.00x faster" in reason and "3.64x smaller" in reason and "-0.50 pts" in reason


def test_a_latency_tie_goes_to_the_smaller_file() -> None:
    variants = [
        _variant("fp32", 0.95, 1.00, 400_000),
        _variant("fp32+onnx", 0.95, 0.300, 400_000),
        _variant("fp32+onnx_int8", 0.95, 0.310, 110_000),  # 3% slower: a tie at 5%
    ]
    assert recommend(variants, "classification", 0.01, 0.02, latency_tie=0.05)[0] == "fp32+onnx_int8"
    assert recommend(variants, "classification", 0.01, 0.02, latency_tie=0.0)[0] == "fp32+onnx"


def test_nothing_within_tolerance_recommends_the_baseline_and_failed_rows_never_win() -> None:
    variants = [
        _variant("fp32", 0.95, 1.0, 400_000),
        _variant("pruned", 0.80, 0.5, 400_000),
        _variant("fp32+onnx_int8", 0.0, 0.0, 0, status="failed"),
    ]
    name, reason = recommend(variants, "classification", 0.01, 0.02, 0.05)
    assert name == "fp32" and "no variant" in reason


def test_perplexity_tolerance_is_relative() -> None:
    def lm(name: str, ppl: float, p50: float) -> CompressedVariant:
        v = _variant(name, 0.0, p50, 1000)
        return v.model_copy(update={"metrics": {"perplexity": ppl, "loss": float(np.log(ppl))}})

    variants = [lm("fp32", 5.00, 1.0), lm("fp32+onnx_int8", 5.09, 0.5), lm("fp32+torch_int8", 5.20, 0.4)]
    assert recommend(variants, "language_modeling", 0.01, 0.02, 0.05)[0] == "fp32+onnx_int8"  # +1.8% ok, +4% not


def test_the_table_marks_the_recommendation_shows_failures_and_the_onnx_fp32_speed_up() -> None:
    variants = [
        _variant("fp32", 0.950, 1.00, 400_000),
        _variant("fp32+onnx", 0.950, 0.40, 400_000),
        _variant("fp32+onnx_int8", 0.945, 0.20, 100_000),
        _variant("pruned_structured+onnx_int8", 0.0, 0.0, 0, status="failed"),
    ]
    rows = table_rows(variants, "classification", "fp32+onnx_int8")
    text = markdown_table(rows, threads=1, serving_batch=256)
    assert "**fp32+onnx_int8** (recommended)" in text
    assert "| 5.00x | 2.00x |" in text  # over eager fp32 and over ONNX Runtime fp32
    assert "ExportError: op not supported" in text and "failed" in text
    assert "4.00x" in text  # size
    lines = csv_table(variants).splitlines()
    assert lines[0].startswith("name,base,format,runtime,status") and len(lines) == 5
    assert pareto_png(variants, "classification", "fp32+onnx_int8")[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_match_a_direct_computation_and_speed_covers_every_candidate() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    weights = np.array([[-1.0, 1.0], [0, 0], [0, 0], [0, 0]], dtype=np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        return batch @ weights

    metrics = task_metrics(predict, HeldOut(x, y, "classification"), batch_size=7)
    assert metrics["accuracy"] == pytest.approx(1.0)
    logits = x @ weights
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert metrics["loss"] == pytest.approx(-log_probs[np.arange(50), y].mean(), rel=1e-5)

    calls = {"a": 0, "b": 0}

    def counting(name: str):
        def run(batch: np.ndarray) -> np.ndarray:
            calls[name] += 1
            return predict(batch)

        return run

    cfg = MeasureConfig(threads=1, warmup=2, latency_calls=20, rounds=4, serving_batch=50, throughput_calls=4)
    speeds = measure_speed({n: counting(n) for n in ("a", "b")}, x, cfg)
    assert set(speeds) == {"a", "b"} and calls["a"] == calls["b"] == 2 + 1 + 20 + 4
    assert all(s.latency_ms_p95 >= s.latency_ms_p50 > 0 and s.throughput > 0 for s in speeds.values())
