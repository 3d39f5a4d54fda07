"""One pipeline run around the stages: the MLflow parent run, per-stage timing and
cache status, and summary.json. Keeps the flow itself down to wiring."""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from prefect import Task
from prefect.runtime import flow_run

from trainflow.core.config import Config
from trainflow.core.config.secrets import mask_secrets
from trainflow.core.errors import StageTimeoutError
from trainflow.core.records import CompressResult, HPOSearchResult, PrepareDataResult, StageResult
from trainflow.core.report import write_report
from trainflow.core.storage.files import write_atomic
from trainflow.core.storage.store import resolved
from trainflow.core.storage.version import code_version, git_commit
from trainflow.core.tracking.run_meta import log_dataset_input, source_tags
from trainflow.core.tracking.runs import CONFIG_TAG, PIPELINE_TAG, Tracker, flatten
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.tuning.join import join_key
from trainflow.core.tuning.plan import Tuned
from trainflow.tasks.artifacts import compression_table, hpo_trials_table, mlflow_run_link, run_summary
from trainflow.tasks.cache import result_storage
from trainflow.tasks.context import StageContext, stage_run
from trainflow.tasks.skipped import skipped_stage

R = TypeVar("R", bound=StageResult)
log = logging.getLogger(__name__)


class PipelineRun:
    def __init__(
        self,
        config: Config,
        config_path: str,
        out_dir: str | None = None,
        reuse_only: frozenset[str] = frozenset(),
        overrides: list[str] | None = None,
    ):
        """`reuse_only`: stages this flow takes from the cache only; with no cached record for them it fails."""
        self.config, self.config_path, self.reuse_only = config, config_path, reuse_only
        self.name = Path(config_path).stem  # the config's name: Prefect artifact keys
        self.run_name = run_name(self.name, flow_run.flow_name, overrides or [])
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.stages: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}  # stage -> why it did not run
        self.changes: dict[str, Any] = {}  # what the tuning stages set (dotted path -> value)
        self.tuned_config = config  # the config with those values applied

    def __enter__(self) -> PipelineRun:
        config = self.config
        self.tracker = Tracker.for_config(config, self.name)
        self._runs = ExitStack()
        tags = {PIPELINE_TAG: "true", CONFIG_TAG: config.sha256()}
        continued = self.tracker.unfinished_pipeline_run(config.sha256())
        if continued:
            log.info("continuing unfinished MLflow run %s of this config", continued)
        self.run = self._runs.enter_context(self.tracker.run(self.run_name, tags=tags, run_id=continued))
        self.run_id = self.run.run_id
        try:
            self._start()
        except BaseException as exc:  # the parent run ends FAILED (KILLED) with it
            self._runs.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _start(self) -> None:
        """The parent run's params, tags and config; the context every stage gets."""
        config = self.config
        self.run.log_params(flatten(config.model_dump(mode="json")))
        self.run.set_tags(
            {
                "mlflow.source.git.commit": git_commit() or "unknown",
                "trainflow.code_version": code_version(),
                "trainflow.prefect_flow_run_id": flow_run.id or "",
                "trainflow.flow": flow_run.flow_name or "",
                **source_tags(self.config_path),
            }
        )
        self.run.log_dict(config.model_dump(mode="json"), "config.yaml")
        self.ctx = StageContext(
            store=resolved(config.store),
            tracking_uri=self.tracker.uri,
            experiment_id=self.tracker.experiment_id,
            parent_run_id=self.run_id,
            name=self.name,
            reuse_only=self.reuse_only,
            join_key=join_key(config),
        )
        self._storage = result_storage(self.ctx.store)

    def stage(self, task: Task[..., R], **inputs: Any) -> R:
        """Run one stage task (or take its cached record) and note its time and cache status."""
        started = time.perf_counter()
        limit = self.config.timeouts.for_stage(task.name)
        state = task.with_options(result_storage=self._storage, timeout_seconds=limit)(
            **inputs, ctx=self.ctx, return_state=True
        )
        if state.name == "TimedOut":
            raise StageTimeoutError(
                f"{task.name}: stopped after {limit:g} s, the limit timeouts.{task.name} sets; raise it (or set it to "
                "null) and re-run: finished stages are re-used" + (", training resumes from its last checkpoint"
                                                                   if task.name == "train" else "")
            )  # fmt: skip
        record: R = state.result()  # re-raises the stage's exception
        cached = state.name == "Cached"
        self._show(record)
        self.run.set_tags(record.run_tags())
        if isinstance(record, PrepareDataResult):  # the runs table's Dataset column
            log_dataset_input(self.tracker.client, self.run_id, record)
        if cached:  # still visible in MLflow: a child run pointing at the cached record
            with stage_run(self.ctx.model_copy(update={"reuse_only": frozenset()}), task.name, {}) as run:
                run.set_tags({"trainflow.cached": "true"})
                run.log_dict(record.model_dump(mode="json"), "result.json")
        self.stages[task.name] = {"seconds": round(time.perf_counter() - started, 3), "cached": cached,
                                  **record.model_dump(mode="json")}  # fmt: skip
        return record

    def _show(self, record: StageResult) -> None:
        """Table artifacts of this flow run, for cached records too: the HPO trials, the compression comparison."""
        if isinstance(record, HPOSearchResult):
            _best_effort(hpo_trials_table, record, self.name)
        elif isinstance(record, CompressResult):
            _best_effort(compression_table, record, self.name)

    def stage_if(self, plan: tuple[bool, str], task: Task[..., R], **inputs: Any) -> R | None:
        """Run the stage when `plan` says it is needed; otherwise show it as Skipped, with the reason."""
        needed, reason = plan
        if needed:
            return self.stage(task, **inputs)
        log.info("%s: skipped: %s", task.name, reason)
        skipped_stage.with_options(name=task.name)(reason)
        self.skipped[task.name] = reason
        return None

    def tuned(self, tuning: Tuned) -> TrainingSpec:
        """Note the values the tuning stages set (summary.json `tuned`, MLflow params `tuned.*`) and the tuned
        config (published, reported); the training spec they make."""
        self.changes, self.tuned_config = tuning.changes, tuning.config
        if tuning.changes:
            self.run.log_params({f"tuned.{path}": value for path, value in tuning.changes.items()})
        return tuning.spec

    def summary(self) -> dict[str, Any]:
        return {
            "mlflow_run_id": self.run_id,
            "mlflow_tracking_uri": self.ctx.tracking_uri,
            "mlflow_experiment_id": self.ctx.experiment_id,
            "mlflow_experiment_name": self.tracker.experiment_name,
            "prefect_flow_run_id": flow_run.id,
            "config_sha256": self.config.sha256(),
            "store_uri": self.ctx.store_uri,
            "tuned": self.changes,
            "stages": self.stages,
            "skipped": self.skipped,
        }

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            try:
                self._finish()
            except BaseException as failed:  # the parent run ends FAILED with it
                self._runs.__exit__(type(failed), failed, failed.__traceback__)
                raise
        self._runs.__exit__(kind, exc, tb)

    def _finish(self) -> None:
        """summary.json (output folder and MLflow), the run report, the Prefect summary artifact, the run's tags."""
        summary = json.loads(mask_secrets(json.dumps(self.summary())))  # URLs as shown: no password, no reference
        cached = ",".join(name for name, info in self.stages.items() if info["cached"])
        self.run.set_tags({"trainflow.cached_stages": cached, "trainflow.skipped_stages": ",".join(self.skipped)})
        self.run.log_dict(summary, "summary.json")
        if self.out_dir is not None:
            write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2).encode())
        _best_effort(write_report, summary, self.tuned_config, self.out_dir, self.tracker.client, self.run_id)
        link = mlflow_run_link(self.ctx.tracking_uri, self.ctx.experiment_id, self.run_id)
        _best_effort(run_summary, summary, self.name, link)


def run_name(config_name: str, flow_name: str | None, overrides: list[str]) -> str:
    """The MLflow parent run's name: the config, the flow when it is not the whole pipeline, the overrides
    (`digits`, `digits [tune]`, `digits optim.lr=0.05`), so runs tell themselves apart in MLflow's lists."""
    flow = f" [{flow_name}]" if flow_name and flow_name != "training_pipeline" else ""
    return f"{config_name}{flow}" + "".join(f" {item}" for item in overrides)


def _best_effort(make: Any, *args: Any) -> None:
    """Reports and Prefect artifacts are for people to read: failing to make one is logged, never a failed run."""
    try:
        make(*args)
    except Exception as exc:
        log.warning("%s failed (%s: %s)", make.__name__, type(exc).__name__, exc)
