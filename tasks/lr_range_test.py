"""Prefect task: lr_range_test (see core.lr_range_test)."""

from __future__ import annotations

from prefect import task

from core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from core.lr_range_test import LRRangeTestResult, lr_range_test
from core.prepare_data import PrepareDataResult
from core.store import open_store
from core.tune_config import LRRangeTestConfig
from tasks.cache import current_stage_key, stage_cache
from tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("lr_range_test"))
def lr_range_test_task(
    lr_test: LRRangeTestConfig,
    model: ModelConfig,
    optim: OptimConfig,
    train_cfg: TrainConfig,
    loader: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    ctx: StageContext,
) -> LRRangeTestResult:
    """Sweep the LR on a fresh model and suggest one."""
    store = open_store(ctx.store_uri)
    key = f"stages/lr_range_test/{current_stage_key('lr_range_test')}"
    with stage_run(ctx, "lr_range_test", {"lr_range_test": lr_test.model_dump(mode="json")}) as run:
        result = lr_range_test(lr_test, model, optim, train_cfg, loader, seed, data, store, key)
        run.log_artifact(store.local_path(result.plot_uri), "plots")
        run.log_artifact(store.local_path(result.curve_uri))
        run.set_tags({"trainflow.lr_reason": result.reason})
        log_result(run, result)
    return result
