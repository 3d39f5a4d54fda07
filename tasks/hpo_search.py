"""Prefect task: hpo_search (see core/hpo_search.py). Trials are MLflow child runs of this stage's run."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import DataConfig, HPOConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.hpo_search import hpo_search
from trainflow.core.records import HPOSearchResult, LRRangeTestResult, PrepareDataResult
from trainflow.core.storage.tracking import ParentRun
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("hpo_search"))
def hpo_search_task(
    hpo_cfg: HPOConfig,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data: PrepareDataResult,
    lr_range: LRRangeTestResult | None,
    ctx: StageContext,
) -> HPOSearchResult:
    """Run or continue the Optuna study; the best parameters go into the training config."""
    store, key = stage_store(ctx.store, "hpo_search")
    with stage_run(ctx, "hpo_search", {"hpo": hpo_cfg.model_dump(mode="json")}) as run:
        parent = ParentRun(ctx.tracking_uri, ctx.experiment_id, run.run_id)
        result = hpo_search(hpo_cfg, data_cfg, model_cfg, optim_cfg, train_cfg, seed, data, lr_range, store, key,
                            parent)  # fmt: skip
        run.log_params({f"best.{path}": value for path, value in result.best_params.items()})
        run.log_artifact(store.local_path(result.plot_uri), "plots")
        if result.importances:
            table = {"param": list(result.importances), "importance": list(result.importances.values())}
            run.client.log_table(run.run_id, table, "param_importance.json")
        log_result(run, result)
    return result
