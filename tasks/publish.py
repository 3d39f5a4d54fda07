"""Prefect task: publish (see core/publish.py). Idempotent, so transient store errors are retried."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import Config
from trainflow.core.records import CompressResult, EvaluateResult, PublishResult, TrainResult
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, stage_run


@task(retries=2, retry_delay_seconds=[2, 10], **stage_cache("publish"))
def publish_task(
    config: Config,
    spec: TrainingSpec,
    trained: TrainResult,
    evaluated: EvaluateResult,
    compressed: CompressResult | None,
    ctx: StageContext,
) -> PublishResult:
    """Write the published folder and manifest to the store; log (and register) the served MLflow model."""
    from trainflow.core.publish import publish  # loaded when it runs: tasks/__init__.py

    store, key = stage_store(ctx.store, "publish", folder=f"published/{config.publish.name}")
    with stage_run(ctx, "publish", {"publish": config.publish.model_dump(mode="json")}) as run:
        result = publish(config, spec, trained, evaluated, store, key, run, compressed)
        run.log_dict(result.model_dump(mode="json"), "result.json")
        run.log_artifact(store.local_path(result.manifest_uri))
    return result
