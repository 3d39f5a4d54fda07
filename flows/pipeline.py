"""The training pipeline as a Prefect flow: prepare_data -> train -> evaluate -> publish.

Run it with `trainflow run configs/digits.yaml`, or serve it from `deployments/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.config import load_config
from flows.pipeline_run import PipelineRun
from tasks.evaluate import evaluate_task
from tasks.prepare_data import prepare_data_task
from tasks.publish import publish_task
from tasks.train import train_task


@flow(name="training_pipeline", flow_run_name="{config_path}", validate_parameters=False)
def training_pipeline(
    config_path: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> dict[str, Any]:
    """One YAML config in; a trained, evaluated and published model out. Returns summary.json's content."""
    config = load_config(config_path, overrides or [])
    with PipelineRun(config, run_name=Path(config_path).stem) as run:
        data = run.stage(prepare_data_task, data=config.data, seed=config.seed)
        trained = run.stage(train_task, model=config.model, optim=config.optim, train_cfg=config.train,
                            loader=config.data.loader, seed=config.seed, data=data)  # fmt: skip
        evaluated = run.stage(evaluate_task, evaluate_cfg=config.evaluate, model=config.model, train_cfg=config.train,
                              loader=config.data.loader, seed=config.seed, data=data, trained=trained)  # fmt: skip
        run.stage(publish_task, config=config, data=data, trained=trained, evaluated=evaluated)
    return run.write_summary(out_dir)
