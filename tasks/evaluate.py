"""Prefect task: evaluate (see core/evaluate.py)."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import MeasureConfig
from trainflow.core.records import EvaluateResult, TrainResult
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("evaluate"))
def evaluate_task(
    measure_cfg: MeasureConfig, spec: TrainingSpec, trained: TrainResult, ctx: StageContext
) -> EvaluateResult:
    """Test-set metrics, latency, throughput and size of the trained model."""
    from trainflow.core.evaluate import evaluate  # loaded when it runs: tasks/__init__.py

    store, key = stage_store(ctx.store, "evaluate")
    with stage_run(ctx, "evaluate", {"measure": measure_cfg.model_dump(mode="json")}) as run:
        result = evaluate(spec, measure_cfg, trained, store, key)
        run.log_metrics({f"test/{name}": value for name, value in result.metrics.items()}, step=0)
        for uri in result.plot_uris:
            run.log_artifact(store.local_path(uri), "plots")
        log_result(run, result)
    return result
