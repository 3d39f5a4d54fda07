"""Prefect task: lr_range_test (see core/lr_range_test.py)."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import LoaderConfig, LRRangeTestConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.lr_range_test import lr_range_test
from trainflow.core.records import LRRangeTestResult, PrepareDataResult
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("lr_range_test"))
def lr_range_test_task(
    lr_range_test_cfg: LRRangeTestConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    ctx: StageContext,
) -> LRRangeTestResult:
    """Sweep the LR on a fresh model and suggest one."""
    store, key = stage_store(ctx.store, "lr_range_test")
    params = {"lr_range_test": lr_range_test_cfg.model_dump(mode="json")}
    with stage_run(ctx, "lr_range_test", params) as run:
        result = lr_range_test(lr_range_test_cfg, model_cfg, optim_cfg, train_cfg, loader_cfg, seed, data, store, key)
        run.log_artifact(store.local_path(result.plot_uri), "plots")
        run.log_artifact(store.local_path(result.curve_uri))
        log_result(run, result)
    return result
