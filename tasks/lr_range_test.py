"""Prefect task: lr_range_test (see core/lr_range_test.py)."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import LRRangeTestConfig
from trainflow.core.records import LRRangeTestResult
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("lr_range_test"))
def lr_range_test_task(
    lr_range_test_cfg: LRRangeTestConfig, spec: TrainingSpec, ctx: StageContext
) -> LRRangeTestResult:
    """Sweep the LR on a fresh model and suggest one."""
    from trainflow.core.lr_range_test import lr_range_test  # loaded when it runs: tasks/__init__.py

    store, key = stage_store(ctx.store, "lr_range_test")
    with stage_run(ctx, "lr_range_test", {"lr_range_test": lr_range_test_cfg.model_dump(mode="json")}) as run:
        result = lr_range_test(lr_range_test_cfg, spec, store, key)
        run.log_artifact(store.local_path(result.plot_uri), "plots")
        run.log_artifact(store.local_path(result.curve_uri))
        log_result(run, result)
    return result
