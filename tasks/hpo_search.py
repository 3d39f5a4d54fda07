"""Prefect task: hpo_search (see core.hpo_search). Trials are MLflow child runs of this stage's run."""

from __future__ import annotations

from prefect import task

from core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from core.hpo_search import HPOSearchResult, hpo_search
from core.lr_range_test import LRRangeTestResult
from core.prepare_data import PrepareDataResult
from core.store import open_store
from core.tune_config import HPOConfig
from tasks.cache import current_stage_key, stage_cache
from tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("hpo_search"))
def hpo_search_task(
    hpo: HPOConfig,
    data_cfg: DataConfig,
    model: ModelConfig,
    optim: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data: PrepareDataResult,
    lr_test: LRRangeTestResult | None,
    ctx: StageContext,
) -> HPOSearchResult:
    """Run or continue the Optuna study; the best parameters go into the training config."""
    store = open_store(ctx.store_uri)
    key = f"stages/hpo_search/{current_stage_key('hpo_search')}"
    with stage_run(ctx, "hpo_search", {"hpo": hpo.model_dump(mode="json")}) as run:
        tracking = (ctx.tracking_uri, ctx.experiment_id, run.run_id)
        result = hpo_search(hpo, data_cfg, model, optim, train_cfg, seed, data, lr_test, store, key, tracking)
        run.log_params({f"best.{path}": value for path, value in result.best_params.items()})
        run.log_artifact(store.local_path(result.plot_uri), "plots")
        if result.importances:
            run.client.log_table(run.run_id, {"param": list(result.importances),
                                              "importance": list(result.importances.values())},
                                 "param_importance.json")  # fmt: skip
        log_result(run, result)
    return result
