"""The training pipeline as Prefect flows:
prepare_data -> lr_range_test -> hpo_search -> train -> evaluate -> compress -> publish.

Each line of `run_stages` is one stage: flows/pipeline.py -> tasks/<stage>.py -> core/<stage>.py.
`training_pipeline` runs them all; the stand-alone flows run a part, on the same cache, so each re-uses
what the others computed: `tune` (through the search), `train` (through evaluate), `compress_publish`
(compress and publish a model already trained; it never trains). Run one with `trainflow run CONFIG`,
or serve them from `deployments/` (`trainflow serve`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from trainflow.core.data.sources import data_version
from trainflow.core.models.warm_start import reused_preprocessing
from trainflow.core.preflight import checked_config
from trainflow.core.tracking.backend import quiet_mlflow
from trainflow.core.tuning.plan import hpo_search_plan, lr_range_test_plan, lr_range_test_spec, search_spec, tuned
from trainflow.flows.pipeline_run import PipelineRun
from trainflow.tasks.compress import compress_task
from trainflow.tasks.evaluate import evaluate_task
from trainflow.tasks.hpo_search import hpo_search_task
from trainflow.tasks.lr_range_test import lr_range_test_task
from trainflow.tasks.prepare_data import prepare_data_task
from trainflow.tasks.publish import publish_task
from trainflow.tasks.train import train_task

TRAINED = frozenset({"prepare_data", "lr_range_test", "hpo_search", "train", "evaluate"})


def run_stages(
    config_path: str, overrides: list[str] | None, out_dir: str | None, last: str = "publish",
    reuse_only: frozenset[str] = frozenset(),
) -> dict[str, Any]:  # fmt: skip
    """The stages in order, up to `last` (hpo_search, evaluate or publish); summary.json's content."""
    quiet_mlflow()  # a worker's flow run has not been through the `trainflow` command
    config = checked_config(config_path, overrides or [])
    with PipelineRun(config, config_path, out_dir, reuse_only, overrides) as run:
        data = run.stage(prepare_data_task, data_cfg=config.data, seed=config.seed,
                         source_version=data_version(config.data, config.store),
                         preprocessing=reused_preprocessing(config))  # fmt: skip
        # The tuning stages train with the loop settings at their defaults: training longer re-runs neither.
        lr_range = run.stage_if(lr_range_test_plan(config), lr_range_test_task, spec=lr_range_test_spec(config, data),
                                lr_range_test_cfg=config.tune.lr_range_test)  # fmt: skip
        search = run.stage_if(hpo_search_plan(config), hpo_search_task, hpo_cfg=config.tune.hpo,
                              spec=search_spec(config, data, lr_range), lr_range=lr_range)  # fmt: skip
        spec = run.tuned(tuned(config, data, lr_range, search))  # the training, every tuned value concrete
        if last == "hpo_search":
            return run.summary()
        trained = run.stage(train_task, spec=spec)
        evaluated = run.stage(evaluate_task, measure_cfg=config.compress.measure, spec=spec, trained=trained)
        if last == "evaluate":
            return run.summary()
        compressed = run.stage_if((config.compress.enabled, "compress.enabled is false"), compress_task,
                                  compress_cfg=config.compress, spec=spec, trained=trained)  # fmt: skip
        run.stage(publish_task, config=run.tuned_config, spec=spec, trained=trained, evaluated=evaluated,
                  compressed=compressed)  # fmt: skip
    return run.summary()


FLOW = {"flow_run_name": "{config_path}", "validate_parameters": False}


@flow(name="training_pipeline", **FLOW)
def training_pipeline(
    config_path: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> dict[str, Any]:
    """One YAML config in; a tuned, trained, evaluated and published model out. Returns summary.json's content."""
    return run_stages(config_path, overrides, out_dir)


@flow(name="tune", **FLOW)
def tune_flow(config_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Prepare the data, run the LR range test and the hyperparameter search; the tuned values in the summary."""
    return run_stages(config_path, overrides, out_dir, last="hpo_search")


@flow(name="train", **FLOW)
def train_flow(config_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Tune (or re-use the tuning), train and evaluate; no compression, nothing published."""
    return run_stages(config_path, overrides, out_dir, last="evaluate")


@flow(name="compress_publish", **FLOW)
def compress_publish_flow(
    config_path: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> dict[str, Any]:
    """Compress and publish the model the pipeline or the train flow trained for this config; it never trains:
    without a cached trained model it fails, naming the stage."""
    return run_stages(config_path, overrides, out_dir, reuse_only=TRAINED)


FLOWS = {
    "pipeline": training_pipeline,
    "tune": tune_flow,
    "train": train_flow,
    "compress-publish": compress_publish_flow,
}
