"""The compression comparison: which variant to ship and why, as a table (Markdown, CSV) and a Pareto plot.

The recommended variant is the fastest at batch 1 among those within the quality tolerance of the fp32
model (accuracy drop in points, or relative perplexity rise); latencies within `latency_tie` of the
fastest count as a tie, and the smallest file wins a tie. The fp32 model itself always qualifies.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from trainflow.core.records import CompressedVariant

BASELINE = "fp32"
ORT_BASELINE = "fp32+onnx"


def quality_metric(task: str) -> tuple[str, str]:
    """(metric, direction) a variant is judged by: accuracy (higher is better) or perplexity (lower)."""
    return ("perplexity", "min") if task == "language_modeling" else ("accuracy", "max")


def within_tolerance(
    variant: CompressedVariant, baseline: CompressedVariant, task: str, accuracy_drop: float, perplexity_rise: float
) -> bool:
    metric, _ = quality_metric(task)
    if variant.status != "ok" or metric not in variant.metrics:
        return False
    value, reference = variant.metrics[metric], baseline.metrics[metric]
    if metric == "accuracy":
        return reference - value <= accuracy_drop + 1e-9
    return value <= reference * (1 + perplexity_rise) + 1e-9


def recommend(
    variants: Sequence[CompressedVariant],
    task: str,
    accuracy_drop: float,
    perplexity_rise: float,
    latency_tie: float,
) -> tuple[str, str]:
    """(name, reason) of the variant to ship."""
    baseline = _by_name(variants, BASELINE)
    eligible = [v for v in variants if within_tolerance(v, baseline, task, accuracy_drop, perplexity_rise)]
    if baseline not in eligible:
        eligible.append(baseline)
    fastest = min(v.latency_ms_p50 or float("inf") for v in eligible)
    ties = [v for v in eligible if (v.latency_ms_p50 or float("inf")) <= fastest * (1 + latency_tie)]
    chosen = min(ties, key=lambda v: (v.size_bytes or 0, v.latency_ms_p50 or 0))
    metric, _ = quality_metric(task)
    limit = f"{accuracy_drop * 100:g} point(s)" if metric == "accuracy" else f"+{perplexity_rise:.0%}"
    if chosen.name == BASELINE:
        return chosen.name, f"no variant was faster at batch 1 within the tolerance ({metric} {limit})"
    faster, smaller = (
        _ratio(baseline.latency_ms_p50, chosen.latency_ms_p50),
        _ratio(baseline.size_bytes, chosen.size_bytes),
    )
    reason = (
        f"{faster} faster at batch 1 and {smaller} smaller than fp32, {metric} {_delta(chosen, baseline, metric)} "
        f"(tolerance {limit}); fastest of {len(eligible)} variant(s) within tolerance"
    )
    if len(ties) > 1:
        reason += f", smallest of {len(ties)} tied within {latency_tie:.0%}"
    return chosen.name, reason


COLUMNS = ("variant", "runtime", "metric", "change", "p50 ms", "p95 ms", "x fp32", "x onnx fp32", "throughput/s",
           "size KB", "x smaller", "params", "sparsity", "note")  # fmt: skip


def table_rows(variants: Sequence[CompressedVariant], task: str, recommended: str) -> list[list[str]]:
    """The comparison as rows of text, one per variant, the recommended one marked."""
    metric, _ = quality_metric(task)
    baseline = _by_name(variants, BASELINE)
    ort = next((v for v in variants if v.name == ORT_BASELINE and v.status == "ok"), None)
    rows = []
    for v in variants:
        name = f"**{v.name}** (recommended)" if v.name == recommended else v.name
        if v.status != "ok":
            rows.append([name, v.runtime, "failed", "", "", "", "", "", "", "", "", "", "", v.reason])
            continue
        rows.append([
            name,
            v.runtime,
            f"{metric} {v.metrics[metric]:.4f}",
            _delta(v, baseline, metric),
            f"{v.latency_ms_p50:.3f}",
            f"{v.latency_ms_p95:.3f}",
            _ratio(baseline.latency_ms_p50, v.latency_ms_p50),
            _ratio(ort.latency_ms_p50, v.latency_ms_p50) if ort else "",
            f"{v.throughput:,.0f}",
            f"{(v.size_bytes or 0) / 1024:,.1f}",
            _ratio(baseline.size_bytes, v.size_bytes),
            f"{v.params:,}" if v.params is not None else "",
            f"{v.sparsity:.0%}" if v.sparsity is not None else "",
            v.reason,
        ])  # fmt: skip
    return rows


def markdown_table(rows: list[list[str]], threads: int, serving_batch: int) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |\n" for row in rows)
    note = (
        f"\nLatency: batch 1, {threads} intra-op thread(s), variants alternated in one process; "
        f"throughput at batch {serving_batch}. x fp32 / x onnx fp32: batch-1 speed-up over eager PyTorch fp32 "
        "and over ONNX Runtime fp32.\n"
    )
    return header + body + note


def csv_table(variants: Sequence[CompressedVariant]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    metrics = sorted({k for v in variants for k in v.metrics})
    fields = ["name", "base", "format", "runtime", "status", "latency_ms_p50", "latency_ms_p95", "throughput",
              "size_bytes", "params", "sparsity"]  # fmt: skip
    writer.writerow(fields + metrics + ["reason"])
    for v in variants:
        values = [getattr(v, f) for f in fields]
        writer.writerow(["" if x is None else x for x in values] + [v.metrics.get(m, "") for m in metrics] + [v.reason])
    return buffer.getvalue()


def pareto_png(variants: Sequence[CompressedVariant], task: str, recommended: str) -> bytes:
    """Quality against batch-1 latency (log x), marker area proportional to file size, the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, direction = quality_metric(task)
    ok = [v for v in variants if v.status == "ok" and metric in v.metrics]
    largest = max((v.size_bytes or 1) for v in ok)
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for v in ok:
        axes.scatter(v.latency_ms_p50, v.metrics[metric], s=40 + 800 * (v.size_bytes or 0) / largest, alpha=0.55,
                     edgecolors="black" if v.name == recommended else "none", linewidths=2)  # fmt: skip
        axes.annotate(v.name, (v.latency_ms_p50, v.metrics[metric]), fontsize=7, xytext=(4, 4),
                      textcoords="offset points")  # fmt: skip
    front = _pareto_front(ok, metric, direction)
    axes.plot(
        [v.latency_ms_p50 for v in front], [v.metrics[metric] for v in front], "k--", lw=0.8, label="Pareto front"
    )
    axes.set_xscale("log")
    axes.set_xlabel("batch-1 latency p50 (ms, log scale)")
    axes.set_ylabel(f"test {metric}" + (" (lower is better)" if direction == "min" else ""))
    axes.set_title(f"compressed variants (marker area = file size; outlined: {recommended})")
    axes.legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _pareto_front(variants: list[CompressedVariant], metric: str, direction: str) -> list[CompressedVariant]:
    sign = 1 if direction == "max" else -1
    front, best = [], float("-inf")
    for v in sorted(variants, key=lambda v: (v.latency_ms_p50, -sign * v.metrics[metric])):
        if sign * v.metrics[metric] > best:
            front.append(v)
            best = sign * v.metrics[metric]
    return front


def _by_name(variants: Sequence[CompressedVariant], name: str) -> CompressedVariant:
    return next(v for v in variants if v.name == name)


def _ratio(reference: float | int | None, value: float | int | None) -> str:
    return f"{reference / value:.2f}x" if reference and value else ""


def _delta(v: CompressedVariant, baseline: CompressedVariant, metric: str) -> str:
    if v.name == BASELINE:
        return "baseline"
    change = v.metrics[metric] - baseline.metrics[metric]
    if metric == "accuracy":
        return f"{change * 100:+.2f} pts"
    return f"{change / baseline.metrics[metric]:+.2%}"
