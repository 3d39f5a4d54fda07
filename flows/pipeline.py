"""The training pipeline as a Prefect flow:
prepare_data -> lr_range_test -> hpo_search -> train -> evaluate -> publish.

Run it with `trainflow run configs/digits.yaml`, or serve it from `deployments/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.config import load_config
from core.tuning import apply_tuning, tuning_view
from flows.pipeline_run import PipelineRun
from tasks.evaluate import evaluate_task
from tasks.hpo_search import hpo_search_task
from tasks.lr_range_test import lr_range_test_task
from tasks.prepare_data import prepare_data_task
from tasks.publish import publish_task
from tasks.train import train_task


@flow(name="training_pipeline", flow_run_name="{config_path}", validate_parameters=False)
def training_pipeline(
    config_path: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> dict[str, Any]:
    """One YAML config in; a tuned, trained, evaluated and published model out. Returns summary.json's content."""
    config = load_config(config_path, overrides or [])
    with PipelineRun(config, run_name=Path(config_path).stem) as run:
        data = run.stage(prepare_data_task, data=config.data, seed=config.seed)
        common = {
            "model": config.model,
            "optim": config.optim,
            "train_cfg": tuning_view(config.train),
            "seed": config.seed,
            "data": data,
        }
        lr_test = search = None
        if config.tune.lr_range_test.enabled:
            lr_test = run.stage(
                lr_range_test_task, lr_test=config.tune.lr_range_test, loader=config.data.loader, **common
            )
        if config.tune.hpo.enabled:
            search = run.stage(hpo_search_task, hpo=config.tune.hpo, data_cfg=config.data, lr_test=lr_test, **common)
        tuned = run.tuned(apply_tuning(config, lr_test, search))
        trained = run.stage(train_task, model=tuned.model, optim=tuned.optim, train_cfg=tuned.train,
                            loader=tuned.data.loader, seed=tuned.seed, data=data)  # fmt: skip
        evaluated = run.stage(evaluate_task, evaluate_cfg=tuned.evaluate, model=tuned.model, train_cfg=tuned.train,
                              loader=tuned.data.loader, seed=tuned.seed, data=data, trained=trained)  # fmt: skip
        run.stage(publish_task, config=tuned, data=data, trained=trained, evaluated=evaluated)
    return run.write_summary(out_dir)
