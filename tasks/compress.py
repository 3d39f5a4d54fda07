"""Prefect task: compress (see core/compress.py). One MLflow child run per variant under the stage's run,
plus one per training inside the stage (fine-tunes, the distillation student)."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import CompressConfig
from trainflow.core.records import CompressedVariant, CompressResult, PrepareDataResult, TrainResult
from trainflow.core.serving.mlflow_model import log_onnx_model
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.tracking.runs import RunLogger
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("compress"))
def compress_task(
    compress_cfg: CompressConfig, spec: TrainingSpec, trained: TrainResult, ctx: StageContext
) -> CompressResult:
    """Pruned, quantized and distilled variants, each evaluated like the trained model; the one to ship."""
    from trainflow.core.compress import compress  # loaded when it runs: tasks/__init__.py

    store, key = stage_store(ctx.store, "compress")
    with stage_run(ctx, "compress", {"compress": compress_cfg.model_dump(mode="json")}) as run:
        result = compress(compress_cfg, spec, trained, store, key, lambda name: run.child(f"compress/{name}"))
        for variant in result.variants:
            _log_variant(run, store, variant, variant.name == result.recommended, spec.data)
        for uri in (result.table_uri, result.csv_uri, result.plot_uri):
            run.log_artifact(store.local_path(uri), "comparison")
        run.set_tags({"trainflow.recommended": result.recommended, "trainflow.recommended_reason": result.reason})
        log_result(run, result)
    return result


def _log_variant(
    stage_run: RunLogger, store: ArtifactStore, variant: CompressedVariant, recommended: bool, data: PrepareDataResult
) -> None:
    """The variant's child run: what it is, its figures, and an ONNX variant in MLflow's onnx flavor."""
    params = {"variant": variant.name, "base": variant.base, "format": variant.format, "runtime": variant.runtime,
              "status": variant.status}  # fmt: skip
    with stage_run.child(f"variant/{variant.name}", params) as run:
        run.set_tags({"trainflow.variant_note": variant.reason[:5000], "trainflow.recommended": str(recommended)})
        numbers = {f"test/{k}": v for k, v in variant.metrics.items()}
        for field in ("latency_ms_p50", "latency_ms_p95", "throughput", "size_bytes", "params", "sparsity"):
            value = getattr(variant, field)
            if value is not None:
                numbers[field] = float(value)
        if numbers:
            run.log_metrics(numbers, step=0)
        run.log_dict(variant.model_dump(mode="json"), "variant.json")
        if variant.uri and variant.uri.endswith(".onnx"):
            uri = log_onnx_model(
                store.local_path(variant.uri), data, store, name=variant.name.replace("+", "-"), run=run
            )
            run.set_tags({"trainflow.onnx_model_uri": uri})
