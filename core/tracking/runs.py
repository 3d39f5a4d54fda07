"""MLflow runs by explicit run id, and the one way every run is opened, logged into and ended.

`Tracker.run(...)` (and `RunLogger.child(...)` for a run nested under another) is used by the pipeline's parent
run, every stage, the HPO trials, the compress stage's trainings and variants, and publish: params and tags go in
MLflow's batches, metrics through a background writer, every value passes `mask_secrets`, and a run ends
FINISHED, or FAILED (an exception) or KILLED (a signal, a cancel, or the body's `end_status`) with the error as
the `trainflow.error` tag. Nothing uses MLflow's thread-local active-run stack, so stages in worker threads and
parallel trials never log into the wrong run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainflow.core.config.secrets import hide_passwords, mask_secrets, resolve_optional
from trainflow.core.errors import TrackingError
from trainflow.core.storage.background import BackgroundWorker
from trainflow.core.tracking.backend import (
    artifacts_beside,
    client_for,
    fluent_tracking_uri,
    point_mlflow_s3_at,
    tracking_uri,
)

if TYPE_CHECKING:
    from trainflow.core.config import Config

log = logging.getLogger(__name__)

PIPELINE_TAG, STAGE_TAG, CONFIG_TAG = "trainflow.pipeline", "trainflow.stage", "trainflow.config_sha256"
ERROR_TAG = "trainflow.error"
# The experiment's kind as MLflow 3's UI records it (its kind selector writes this tag): a UI that reads it opens
# the runs table, not the GenAI view (traces, token usage). MLflow 3.17's UI goes by its own "GenAI | Model
# training" switch instead (remembered per browser; `?workflowType=machine_learning` in the URL sets it).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class Tracker:
    """One MLflow experiment's runs, addressed by id."""

    def __init__(self, uri: str, experiment_id: str, experiment_name: str | None = None, client: Any = None):
        """`client`: an MlflowClient on `uri` to share (a run's own); default: a new one. `uri` keeps its `${VAR}`
        references; only the client holds the resolved URI."""
        self.uri, self.experiment_id, self.experiment_name = hide_passwords(uri), experiment_id, experiment_name
        self.client = client if client is not None else client_for(self.uri)

    @classmethod
    def for_config(cls, config: Config, config_name: str = "trainflow") -> Tracker:
        """The pipeline's tracker: `tracking.uri` (MLFLOW_TRACKING_URI wins), its experiment, and
        `tracking.artifact_location` for a new experiment, an s3:// one reached through `store.endpoint_url`."""
        # no password (the preflight refuses one): MLflow stores the location, its references resolved
        location = resolve_optional(config.tracking.artifact_location, "tracking.artifact_location")
        if location is not None and location.startswith("s3://"):
            point_mlflow_s3_at(config.store.endpoint_url)
        name = config.tracking.experiment or config_name  # default: one experiment per config file
        return cls.for_experiment(tracking_uri(config.tracking.uri), name, location)

    @classmethod
    def for_experiment(cls, uri: str, name: str, artifact_location: str | None = None) -> Tracker:
        """Connect, creating the experiment on first use with its artifacts at `artifact_location`; when None
        and the database is SQLite, beside the database file (`mlruns/` next to `mlflow.db`), not in whatever
        folder the run started in. An existing experiment keeps its own location, and its kind when it has one
        (EXPERIMENT_KIND is set on one that has none)."""
        tracker = cls(uri, "", name)
        found = tracker.client.get_experiment_by_name(name)
        if found:
            tracker.experiment_id = found.experiment_id
            if EXPERIMENT_KIND[0] not in found.tags:
                tracker.client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
                log.warning("tracking.artifact_location %s not applied: experiment %r exists and keeps its artifact "
                            "location %s", artifact_location, name, found.artifact_location)  # fmt: skip
        else:
            location = artifact_location or artifacts_beside(uri)
            tracker.experiment_id = tracker.client.create_experiment(
                name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        return tracker

    def unfinished_pipeline_run(self, config_sha256: str) -> str | None:
        """The latest pipeline run of this config that did not finish (a crash, a kill): the re-run continues it."""
        unfinished = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CONFIG_TAG}` = '{config_sha256}' and tags.`{PIPELINE_TAG}` = 'true' "
            "and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return unfinished[0].info.run_id if unfinished else None

    @contextmanager
    def run(
        self,
        name: str,
        parent_run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> Iterator[RunLogger]:
        """A run from start to end: created (or, with `run_id`, re-opened: a resumed training, a continued
        pipeline run) under `parent_run_id`, `params` logged first. It ends FINISHED, or with the body's
        `end_status`; an exception ends it FAILED (KILLED for a signal or a cancel) with the error tagged."""
        run = self._open(name, parent_run_id, tags or {}, run_id)
        try:
            run.log_params(params or {})
            yield run
        except BaseException as exc:
            run.set_tags({ERROR_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
            run.close(raise_failure=False)
            self.client.set_terminated(run.run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
            raise
        run.close()
        self.client.set_terminated(run.run_id, status=run.end_status)

    def _open(self, name: str, parent_run_id: str | None, tags: Mapping[str, str], run_id: str | None) -> RunLogger:
        parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            run = RunLogger(self.client, run_id, self.experiment_id)
            run.set_tags(parent | dict(tags))
            return run
        tags = ({STAGE_TAG: name} if parent_run_id else {}) | parent | dict(tags)
        masked = {key: mask_secrets(str(value)) for key, value in tags.items()}
        created = self.client.create_run(self.experiment_id, run_name=mask_secrets(name), tags=masked)
        return RunLogger(self.client, created.info.run_id, self.experiment_id)


class RunLogger:
    """One MLflow run, by id: what a stage, a trial or a training logs into (a `MetricLogger`).

    Params and tags are written at once, as few `log_batch` calls as MLflow's limits allow. Metrics go through a
    background writer that stores what arrived in one `log_batch` at most every `write_interval_s`: the training
    step never waits on the database, and a run's database work stays a few calls. `flush` waits for them and
    raises a failed write as a TrackingError. Every value and dict passes `mask_secrets` first."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, write_interval_s: float = 2.0):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.write_interval_s = write_interval_s
        self.end_status = "FINISHED"  # a body may end its run otherwise (a pruned trial: KILLED)
        self._writer = BackgroundWorker(f"mlflow-{run_id[:8]}", self._write_failed)
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._flushing = threading.Event()

    @property
    def tracking_uri(self) -> str:
        """The client's URI with its password hidden again (`core.config.secrets`): safe to pass on and to show."""
        return hide_passwords(self.client.tracking_uri)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a launched rank, an HPO worker process) as where to log: it opens its own client."""
        return {"uri": self.tracking_uri, "run_id": self.run_id, "experiment_id": self.experiment_id,
                "interval": self.write_interval_s}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(client_for(state["uri"]), state["run_id"], state["experiment_id"],  # type: ignore[misc]
                      state["interval"])  # fmt: skip

    @contextmanager
    def child(self, name: str, params: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
        """A run nested under this one (a trial, a training inside a stage), opened and ended as every run."""
        with Tracker(self.tracking_uri, self.experiment_id, client=self.client).run(name, self.run_id, params) as run:
            yield run

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self._log_batches([Param(k, mask_secrets(str(v))[:6000]) for k, v in params.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._log_batches([RunTag(k, mask_secrets(str(v))) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self._writer.submit(self._write_pending, f"metrics of run {self.run_id}")

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, json.loads(mask_secrets(json.dumps(data, default=str))), name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    @contextmanager
    def fluent(self) -> Iterator[None]:
        """This run as MLflow's active run on its tracking URI, for the fluent API that has no run id parameter
        (a flavor's `log_model`); the process's own fluent settings are put back afterwards."""
        import mlflow

        with fluent_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=self.run_id):
            yield

    def flush(self) -> None:
        """Wait until every metric sent so far is stored; raise a failed write as a TrackingError."""
        self._flushing.set()
        try:
            self._writer.wait()
        finally:
            self._flushing.clear()

    def close(self, raise_failure: bool = True) -> None:
        """`flush`, then stop the writer's thread (the run is ending)."""
        self._flushing.set()
        try:
            self._writer.close()
        except TrackingError:
            if raise_failure:
                raise
            log.warning("run %s: its last metrics were not stored", self.run_id)

    def _write_pending(self) -> None:
        self._flushing.wait(self.write_interval_s)  # gather until the interval ends or flush() asks to finish
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        self._log_batches(pending)

    def _write_failed(self, what: str, exc: BaseException) -> TrackingError:
        return TrackingError(f"tracking.uri: logging {what} failed ({exc})")

    def _log_batches(self, entities: list[Any]) -> None:
        """As few `log_batch` calls as MLflow's limits allow: 1000 entities, of which 100 params and 100 tags
        (a key given twice keeps its last value)."""
        from mlflow.entities import Metric, Param

        metrics = [e for e in entities if isinstance(e, Metric)]
        params = list({e.key: e for e in entities if isinstance(e, Param)}.values())
        tags = list({e.key: e for e in entities if not isinstance(e, Metric | Param)}.values())
        while metrics or params or tags:
            batch_params, params = params[:100], params[100:]
            batch_tags, tags = tags[:100], tags[100:]
            room = 1000 - len(batch_params) - len(batch_tags)
            batch_metrics, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(self.run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat
