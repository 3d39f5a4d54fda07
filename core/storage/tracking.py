"""MLflow tracking by explicit run ids: one parent run per pipeline run, one child run per stage.

Nothing here uses MLflow's thread-local active-run stack, so stages running in worker threads
(Prefect task runners, parallel trials) never log into the wrong run.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from trainflow.core.errors import TrackingError
from trainflow.core.storage.store import folder_problem

if TYPE_CHECKING:
    from trainflow.core.config import Config

log = logging.getLogger(__name__)

PIPELINE_TAG, STAGE_TAG, CONFIG_TAG = "trainflow.pipeline", "trainflow.stage", "trainflow.config_sha256"
# The experiment's kind as MLflow 3's UI records it (its kind selector writes this tag): a UI that reads it opens
# the runs table, not the GenAI view (traces, token usage). MLflow 3.17's UI goes by its own "GenAI | Model
# training" switch instead (remembered per browser; `?workflowType=machine_learning` in the URL sets it).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(configured: str) -> str:
    """`MLFLOW_TRACKING_URI` from the environment wins over the config, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (`log_model`, `load_model`) at `uri` for a block, then put things back.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ, which would make one
    run's config look like the user's environment setting to every later run in this process.
    """
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


_S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"  # read by mlflow.store.artifact.s3_artifact_repo._get_s3_client
_endpoint_we_set: str | None = None


def point_mlflow_s3_at(endpoint_url: str | None) -> None:
    """Make MLflow's S3 artifact repository use `endpoint_url` (store.endpoint_url) for this process, through
    MLFLOW_S3_ENDPOINT_URL: only when the user has not set that variable (a value set here earlier may change).
    Credentials are never written: boto3's chain supplies them to MLflow as to the store."""
    global _endpoint_we_set
    current = os.environ.get(_S3_ENDPOINT_ENV)
    if current and current != _endpoint_we_set:
        return  # the user's own setting wins
    if endpoint_url:
        os.environ[_S3_ENDPOINT_ENV] = endpoint_url
    else:
        os.environ.pop(_S3_ENDPOINT_ENV, None)
    _endpoint_we_set = endpoint_url


def _artifacts_beside(uri: str) -> str | None:
    """`file://<db folder>/mlruns` for `sqlite:///<path>`; None (MLflow's default) for servers."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def check_reachable(uri: str) -> None:
    """Preflight: the tracking backend can be written (SQLite folder) or answers (HTTP server)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_dir():
            raise TrackingError(f"tracking.uri: {db} is a folder, not an SQLite database file")
        problem = folder_problem(db.parent)
        if problem:
            raise TrackingError(f"tracking.uri: {problem}")
    elif parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
                pass
        except OSError as exc:
            raise TrackingError(f"tracking.uri: MLflow server {uri} is not reachable ({exc})") from None


@dataclass(frozen=True)
class ParentRun:
    """An MLflow run that others nest under, by id: where a stage's own child runs (HPO trials) go."""

    tracking_uri: str
    experiment_id: str
    run_id: str


class Tracker:
    """The pipeline's MLflow runs, addressed by id."""

    def __init__(self, uri: str, experiment_id: str, experiment_name: str | None = None):
        from mlflow import MlflowClient

        self.uri, self.experiment_id, self.experiment_name = uri, experiment_id, experiment_name
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def for_config(cls, config: Config, config_name: str = "trainflow") -> Tracker:
        """The pipeline's tracker: `tracking.uri` (MLFLOW_TRACKING_URI wins), its experiment, and
        `tracking.artifact_location` for a new experiment, an s3:// one reached through `store.endpoint_url`."""
        location = config.tracking.artifact_location
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
            location = artifact_location or _artifacts_beside(uri)
            tracker.experiment_id = tracker.client.create_experiment(
                name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        return tracker

    def open_pipeline_run(self, config_sha256: str, run_name: str) -> str:
        """The parent run: an unfinished run of the same config is continued, else a new one starts."""
        unfinished = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CONFIG_TAG}` = '{config_sha256}' and tags.`{PIPELINE_TAG}` = 'true' "
            "and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if unfinished:
            run_id = unfinished[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            log.info("continuing unfinished MLflow run %s of this config", run_id)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={PIPELINE_TAG: "true", CONFIG_TAG: config_sha256}
        )
        return run.info.run_id

    def start_stage_run(self, parent_run_id: str, stage: str, run_id: str | None = None) -> str:
        """A child run for one stage; `run_id` re-opens an existing one (a resumed training)."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
            return run_id
        tags = {"mlflow.parentRunId": parent_run_id, STAGE_TAG: stage}
        return self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def logger(self, run_id: str) -> MlflowMetricLogger:
        return MlflowMetricLogger(self.client, run_id)


class MlflowMetricLogger:
    """A MetricLogger for one run. Metrics go through a writer thread of our own that stores what arrived
    in one `log_batch` at most every `write_interval_s`: the training step never waits on the database,
    and a run's database work stays a few calls. (MLflow's own async queue costs ~1 s per run at
    `set_terminated`, polling with a 1 s timeout.) `flush` waits for the metrics sent so far and raises
    a write's failure as a TrackingError. Params and tags are written at once, one call per 100."""

    def __init__(self, client: Any, run_id: str, write_interval_s: float = 2.0):
        self.client, self.run_id, self.write_interval_s = client, run_id, write_interval_s
        self._queue: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a launched rank) as where to log: the rank opens its own client on the same run."""
        return {"tracking_uri": self.client.tracking_uri, "run_id": self.run_id, "interval": self.write_interval_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.__init__(MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"], state["interval"])  # type: ignore[misc]

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self._log_batches([Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name=f"mlflow-{self.run_id[:8]}", daemon=True)
            self._writer.start()
        self._queue.put([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._log_batches([RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def flush(self) -> None:
        """Wait until every metric sent so far is stored; re-raise a failure of the writer."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise TrackingError(f"tracking.uri: logging metrics to run {self.run_id} failed ({error})") from error

    def _write(self) -> None:
        done = False
        while not done:
            pending = self._queue.get()
            done = pending is None
            entities = list(pending or [])
            deadline = time.monotonic() + self.write_interval_s
            while not done:  # gather until the interval ends or flush() asks to finish
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                done = more is None
                entities += more or []
            try:
                self._log_batches(entities)
            except Exception as exc:  # reported by flush(), on the caller's thread
                self._error = self._error or exc

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
