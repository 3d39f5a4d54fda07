"""Prefect artifacts, what a run shows in the Prefect UI beside its DAG: the training's progress while it
runs, the HPO trials and the compression comparison as tables, and a Markdown summary of the whole run that
links its MLflow run and the published manifest.

Keys are `<what>-<config name>` (lowercase, dashes), so each config's latest table is one click away under
Artifacts, with every earlier run's version kept in its history.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from trainflow.core.compression.report import COLUMNS, table_rows
from trainflow.core.config.secrets import mask_secrets
from trainflow.core.records import CompressResult, HPOSearchResult
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.state import FitResult

log = logging.getLogger(__name__)


def artifact_key(kind: str, name: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) for `kind` of config `name`."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{name}".lower()).strip("-")


class TrainingProgress(Callback):
    """A progress artifact of the training (percent of the planned optimizer steps), updated at log points at
    most every `interval_s` (each update is a ~10 ms call to the Prefect API on the training's thread). Acts
    only inside a Prefect task run (not in launched ranks, which have no run context)."""

    def __init__(self, name: str, interval_s: float = 5.0):
        self.key, self.interval_s = artifact_key("train-progress", name), interval_s
        self.artifact_id: Any = None
        self.total, self.updated_at = 1, 0.0

    def on_fit_start(self, trainer: Any) -> None:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return
        self.total = max(1, trainer.total_steps)
        self.updated_at = time.monotonic()
        self.artifact_id = create_progress_artifact(
            self._percent(trainer.state.step), key=self.key, description="train: optimizer steps done of planned"
        )

    def on_log(self, trainer: Any, metrics: dict[str, float]) -> None:
        if time.monotonic() - self.updated_at >= self.interval_s:
            self._update(trainer.state.step)

    def on_fit_end(self, trainer: Any, result: FitResult) -> None:
        if self.artifact_id is not None:
            self._update(self.total)  # early stopping ends the plan too

    def _percent(self, step: int) -> float:
        return round(min(100.0, 100.0 * step / self.total), 1)

    def _update(self, step: int) -> None:
        if self.artifact_id is None:
            return
        from prefect.artifacts import update_progress_artifact

        self.updated_at = time.monotonic()
        try:
            update_progress_artifact(self.artifact_id, self._percent(step))
        except Exception as exc:  # the UI's progress bar is not worth a failed training
            log.warning("train progress artifact not updated (%s)", exc)

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key, "interval_s": self.interval_s, "artifact_id": None, "total": 1, "updated_at": 0.0}


def hpo_trials_table(record: HPOSearchResult, name: str) -> None:
    """Every trial of the study: number, state, value, parameters, seconds."""
    import optuna
    from prefect.artifacts import create_table_artifact

    from trainflow.core.tuning.study import rdb_storage

    study = optuna.load_study(study_name=record.study_name, storage=rdb_storage(record.storage))
    rows = []
    for trial in study.trials:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            record.metric: trial.value,
            **{path: trial.params.get(path) for path in record.best_params},
            "seconds": round(seconds, 2) if seconds is not None else None,
            "best": "yes" if trial.number == record.best_trial else "",
        })  # fmt: skip
    create_table_artifact(
        rows,
        key=artifact_key("hpo-trials", name),
        description=f"HPO trials of {name}: {record.n_complete} complete, {record.n_pruned} pruned, "
        f"{record.n_failed} failed; best {record.metric} {record.best_value:.5g} ({record.direction}) "
        f"in trial {record.best_trial}",
    )


def compression_table(record: CompressResult, name: str) -> None:
    """The compression comparison, one row per variant, the recommended one marked."""
    from prefect.artifacts import create_table_artifact

    rows = table_rows(record.variants, record.task, record.recommended)
    rows = [dict(zip(COLUMNS, [cell.replace("**", "") for cell in row], strict=True)) for row in rows]
    create_table_artifact(
        rows,
        key=artifact_key("compression", name),
        description=f"Compressed variants of {name}: recommended {record.recommended} ({record.reason}). "
        f"Batch-1 latency at {record.threads} thread(s).",
    )


def run_summary(summary: dict[str, Any], name: str, mlflow_link: str) -> None:
    """The whole run in Markdown (core/report/summary.py: each stage's time and cache status, the tuned values,
    the test metrics, the recommended variant, the published manifest and registered version) under a link to
    its MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    from trainflow.core.report.summary import summarize

    markdown = f"# {name}: pipeline run\n\nMLflow run: {mask_secrets(mlflow_link)}\n\n{summarize(summary).markdown()}"
    create_markdown_artifact(markdown, key=artifact_key("run-summary", name),
                             description=f"{name}: summary of the pipeline run")  # fmt: skip


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A clickable link when MLflow is a server; otherwise the command that opens the UI on the database."""
    if tracking_uri.startswith(("http://", "https://")):
        # workflowType: MLflow 3's UI shows an experiment's runs under "Model training", not its GenAI view
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
        return f"[{run_id}]({url})"
    return f"`{run_id}` in `{tracking_uri}` (open it: `trainflow ui --tracking-uri {tracking_uri}`)"
