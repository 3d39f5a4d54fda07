"""Prefect task: train (see core/train.py). Re-running after a crash resumes the same MLflow run."""

from __future__ import annotations

import json

from prefect import task

from trainflow.core.records import TrainResult
from trainflow.core.tracking.run_meta import log_dataset_input
from trainflow.core.training.spec import TrainingSpec
from trainflow.tasks.artifacts import TrainingProgress
from trainflow.tasks.cache import stage_cache, stage_store
from trainflow.tasks.context import StageContext, log_result, stage_run

RUN_FILE = "mlflow_run.json"  # the child run id, so a resumed training logs into the same run


@task(**stage_cache("train"))
def train_task(spec: TrainingSpec, ctx: StageContext) -> TrainResult:
    """Fit the model; checkpoints live in the store folder named by this stage's cache key."""
    from trainflow.core.train import raise_if_stopped_by_doctor, train  # loaded when it runs: tasks/__init__.py

    store, key = stage_store(ctx.store, "train")
    run_file = store.workdir(key) / RUN_FILE
    previous = json.loads(run_file.read_text())["run_id"] if spec.train.resume and run_file.exists() else None
    with stage_run(ctx, "train", spec.sections(), run_id=previous) as run:
        run_file.write_text(json.dumps({"run_id": run.run_id}))
        log_dataset_input(run.client, run.run_id, spec.data)  # the Dataset column of the train run, too
        result = train(spec, store, key, logger=run, run_id=run.run_id, callbacks=[TrainingProgress(ctx.name)])
        log_result(run, result)
        if result.diagnosis_uri is not None:  # the doctor's findings and per-layer figures
            run.log_artifact(store.local_path(result.diagnosis_uri))
        raise_if_stopped_by_doctor(result)  # not cached: a re-run resumes
    return result
