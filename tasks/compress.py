"""Prefect task: compress (see core/compress.py). One MLflow child run per variant under the stage's run,
plus one per training inside the stage (fine-tunes, the distillation student)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect import task

from trainflow.core.compress import TrainingSetup, compress
from trainflow.core.config import CompressConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.records import CompressedVariant, CompressResult, PrepareDataResult, TrainResult
from trainflow.core.serving.mlflow_model import log_onnx_model
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.storage.tracking import MlflowMetricLogger, Tracker
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("compress"))
def compress_task(
    compress_cfg: CompressConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    trained: TrainResult,
    ctx: StageContext,
) -> CompressResult:
    """Pruned, quantized and distilled variants, each evaluated like the trained model; the one to ship."""
    store, key = stage_store(ctx.store, "compress")
    setup = TrainingSetup(optim_cfg, train_cfg, loader_cfg, seed)
    with stage_run(ctx, "compress", {"compress": compress_cfg.model_dump(mode="json")}) as run, ExitStack() as runs:
        tracker = Tracker(ctx.tracking_uri, ctx.experiment_id)

        def logger_for(name: str) -> MlflowMetricLogger:
            return runs.enter_context(_child_run(tracker, run.run_id, f"compress/{name}"))

        result = compress(compress_cfg, model_cfg, setup, data, trained, store, key, logger_for)
        for variant in result.variants:
            _log_variant(ctx, store, tracker, run.run_id, variant, variant.name == result.recommended, data)
        for uri in (result.table_uri, result.csv_uri, result.plot_uri):
            run.log_artifact(store.local_path(uri), "comparison")
        run.set_tags({"trainflow.recommended": result.recommended, "trainflow.recommended_reason": result.reason})
        log_result(run, result)
    return result


@contextmanager
def _child_run(tracker: Tracker, parent_run_id: str, name: str) -> Iterator[MlflowMetricLogger]:
    run_id = tracker.start_stage_run(parent_run_id, name)
    logger = tracker.logger(run_id)
    try:
        yield logger
    except BaseException:
        logger.flush()
        tracker.end_run(run_id, "FAILED")
        raise
    logger.flush()
    tracker.end_run(run_id)


def _log_variant(
    ctx: StageContext,
    store: ArtifactStore,
    tracker: Tracker,
    parent_run_id: str,
    variant: CompressedVariant,
    recommended: bool,
    data: PrepareDataResult,
) -> None:
    """The variant's child run: what it is, its figures, and an ONNX variant in MLflow's onnx flavor."""
    with _child_run(tracker, parent_run_id, f"variant/{variant.name}") as logger:
        logger.log_params({"variant": variant.name, "base": variant.base, "format": variant.format,
                           "runtime": variant.runtime, "status": variant.status})  # fmt: skip
        logger.set_tags({"trainflow.variant_note": variant.reason[:5000], "trainflow.recommended": str(recommended)})
        numbers = {f"test/{k}": v for k, v in variant.metrics.items()}
        for field in ("latency_ms_p50", "latency_ms_p95", "throughput", "size_bytes", "params", "sparsity"):
            value = getattr(variant, field)
            if value is not None:
                numbers[field] = float(value)
        if numbers:
            logger.log_metrics(numbers, step=0)
        logger.log_dict(variant.model_dump(mode="json"), "variant.json")
        if variant.uri and variant.uri.endswith(".onnx"):
            name = variant.name.replace("+", "-")
            uri = log_onnx_model(store.local_path(variant.uri), data, store, name=name, tracking_uri=ctx.tracking_uri,
                                 run_id=logger.run_id)  # fmt: skip
            logger.set_tags({"trainflow.onnx_model_uri": uri})
