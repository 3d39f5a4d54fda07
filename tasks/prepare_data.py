"""Prefect task: prepare_data (see core/prepare_data.py)."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import DataConfig
from trainflow.core.records import PrepareDataResult, ReusedPreprocessing
from trainflow.core.storage.store import open_store
from trainflow.tasks.cache import stage_cache
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("prepare_data"))
def prepare_data_task(
    data_cfg: DataConfig,
    seed: int,
    source_version: str,
    ctx: StageContext,
    preprocessing: ReusedPreprocessing | None = None,
) -> PrepareDataResult:
    """Load, split, preprocess and cache the data. `source_version` (`core.data.sources.data_version`) only
    keys the cache: a data file changed in place re-runs the stage. `preprocessing`: a parent model's fitted
    preprocessor applied instead of fitting one (its sha256 keys the cache)."""
    from trainflow.core.prepare_data import prepare_data  # loaded when it runs: tasks/__init__.py

    with stage_run(ctx, "prepare_data", {"data": data_cfg.model_dump(mode="json"), "seed": seed}) as run:
        result = prepare_data(data_cfg, seed, open_store(ctx.store), ctx.store, preprocessing)
        log_result(run, result)
    return result
