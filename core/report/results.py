"""The report's sections from training on: training curves (from the MLflow metric history), the test
evaluation, the compression comparison and what was published. Earlier stages: sections.py."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from trainflow.core.compression.report import COLUMNS, table_rows
from trainflow.core.records import CompressResult, EvaluateResult, PublishResult, TrainResult
from trainflow.core.report.blocks import Image, Section, Sources, Table, Text, facts, fmt
from trainflow.core.report.plots import training_curves_png
from trainflow.core.report.sections import stage_section


def train_section(summary: dict[str, Any], sources: Sources) -> Section:
    def build(section: Section, r: TrainResult) -> None:
        stop = f"{r.stop_reason}: {r.stop_message}" if r.stop_message else r.stop_reason
        section.add(
            Text(f"{r.epochs_run} epoch(s), {r.steps:,} steps; stopped: {stop}."),
            facts({
                "stopped early": r.stopped_early,
                "best val/loss": r.best_val_loss,
                "best step": r.best_step,
                "samples/s": round(r.samples_per_s, 1),
                "effective batch (micro x accumulation x processes)": r.effective_batch_size,
                "micro-batch per process": r.micro_batch_size or None,
                "processes": r.world_size,
                "non-finite steps skipped": r.nonfinite_steps,
                "parameters": r.n_parameters,
                "resumed from step": r.resumed_from_step,
                "checkpoint": r.checkpoint_uri,
                "MLflow train run id": r.mlflow_run_id,
            }),
        )  # fmt: skip
        if r.best_metrics:
            section.add(Table(["best evaluation", "value"], [[k, fmt(v)] for k, v in r.best_metrics.items()]))
        if r.mlflow_run_id is None:
            section.add(Text("No MLflow run: no training curves."))
            return
        history: dict[str, list[tuple[int, float]]] = {}

        def draw() -> bytes | None:
            assert r.mlflow_run_id is not None
            history.update(sources.metric_history(r.mlflow_run_id, section))
            val_metrics = sorted(k for k in history if k.startswith("val/") and k != "val/loss")
            panels = [["train/loss", "val/loss"], val_metrics, ["lr"]]
            if any(history.get(key) for keys in panels for key in keys):
                return training_curves_png(history, panels, r.best_step)
            return None

        # the record names a finished train run, whose history it determines: drawn once per record
        png = sources.kept("training_curves.png", r.model_dump(mode="json"), draw)
        if png is not None:
            section.add(Image("training_curves", png, "Training: loss, validation metrics and LR against step"))
        elif history:
            section.add(Text(f"No curves: the train run logged none of train/loss, val/*, lr ({', '.join(history)})."))

    return stage_section(summary, "train", "Training", TrainResult, build)


def evaluate_section(summary: dict[str, Any], sources: Sources) -> Section:
    def build(section: Section, r: EvaluateResult) -> None:
        section.add(
            Table(["test metric", "value"], [[name, fmt(value)] for name, value in r.metrics.items()]),
            facts({
                "test samples": r.n_test,
                "latency p50 / p95 (batch 1)": f"{r.latency_ms_p50:.3f} ms / {r.latency_ms_p95:.3f} ms",
                "throughput (training batch)": f"{r.throughput_per_s:,.0f} samples/s",
                "parameters": r.n_parameters,
                "weights size": f"{r.size_bytes:,} bytes ({r.size_bytes / 1024:,.1f} KiB)",
            }),
        )  # fmt: skip
        for i, uri in enumerate(r.plot_uris):
            stem = PurePosixPath(uri).stem
            sources.png(uri, f"evaluate_{i}_{stem}", f"Evaluation: {stem.replace('_', ' ')}", section)

    return stage_section(summary, "evaluate", "Evaluation", EvaluateResult, build)


def compress_section(summary: dict[str, Any], sources: Sources) -> Section:
    def build(section: Section, r: CompressResult) -> None:
        section.add(
            Text(f"Recommended: **{r.recommended}**. {r.reason.rstrip('.')}."),
            Table(list(COLUMNS), table_rows(r.variants, r.task, r.recommended)),
            Text(f"Latency: batch 1, {r.threads} intra-op thread(s); throughput at batch {r.serving_batch}. "
                 "x fp32 / x onnx fp32: batch-1 speed-up over eager PyTorch fp32 and over ONNX Runtime fp32."),
        )  # fmt: skip
        sources.png(r.plot_uri, "compress_pareto", "Compression: quality against batch-1 latency", section)

    return stage_section(summary, "compress", "Compression", CompressResult, build)


def publish_section(summary: dict[str, Any], sources: Sources) -> Section:
    def build(section: Section, r: PublishResult) -> None:
        if r.registered_model is not None:
            registered = f"{r.registered_model} version {r.registered_version}"
            section.add(Text(f"Registered as {registered} (aliases: {', '.join(r.aliases) or 'none'})."))
        else:
            section.add(Text("Not registered in the MLflow model registry (publish.registered_model_name is not set)."))
        if r.champion_decision is not None:
            section.add(Text(f"Champion: {r.champion_decision}. {r.champion_reason or ''}".strip()))
        section.add(facts({"manifest": r.manifest_uri, "MLflow model": r.mlflow_model_uri,
                           "compressed variant shipped": r.recommended}))  # fmt: skip
        manifest = sources.json(r.manifest_uri, "the manifest", section)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if isinstance(files, list):
            rows = [[str(f.get("path")), str(f.get("sha256")), fmt(f.get("bytes"))] for f in files]
            section.add(Text(f"Manifest ({manifest.get('format')}): {len(rows)} file(s) besides itself."))
        else:  # the record lists what was written, the manifest included
            rows = [[o.uri, o.sha256, fmt(o.bytes)] for o in r.objects]
            section.add(Text("Files as the publish record lists them:"))
        section.add(Table(["file", "sha256", "bytes"], rows))

    return stage_section(summary, "publish", "Publish", PublishResult, build)
