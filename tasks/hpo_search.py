"""Prefect task: hpo_search (see core/hpo_search.py). Trials are MLflow child runs of this stage's run."""

from __future__ import annotations

from prefect import task

from trainflow.core.config import HPOConfig
from trainflow.core.records import HPOSearchResult, LRRangeTestResult
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run


@task(**stage_cache("hpo_search"))
def hpo_search_task(
    hpo_cfg: HPOConfig, spec: TrainingSpec, lr_range: LRRangeTestResult | None, ctx: StageContext
) -> HPOSearchResult:
    """Run or continue the Optuna study; the best parameters go into the training config."""
    from trainflow.core.hpo_search import hpo_search  # loaded when it runs: tasks/__init__.py

    store, key = stage_store(ctx.store, "hpo_search")
    with stage_run(ctx, "hpo_search", {"hpo": hpo_cfg.model_dump(mode="json")}) as run:
        result = hpo_search(hpo_cfg, spec, lr_range, store, key, parent_run=run, join_key=ctx.join_key)
        run.log_params({f"best.{path}": value for path, value in result.best_params.items()})
        run.log_artifact(store.local_path(result.plot_uri), "plots")
        if result.importances:
            table = {"param": list(result.importances), "importance": list(result.importances.values())}
            run.client.log_table(run.run_id, table, "param_importance.json")
        log_result(run, result)
    return result
