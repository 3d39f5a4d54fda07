"""MLflow tracking against real MLflow on a temporary SQLite file: the one way a run is opened and ended (status,
error tag, nested runs, re-opened runs), secrets masked in everything logged, the metric writer thread (what it
stores, when, how it fails and when it ends), params beyond one batch, where an experiment keeps its artifacts,
and which pipeline run a re-run continues."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from trainflow.core.errors import TrackingError
from trainflow.core.tracking.runs import CONFIG_TAG, ERROR_TAG, PIPELINE_TAG, STAGE_TAG, RunLogger, Tracker

T = TypeVar("T")
EXPERIMENT = "tracking-tests"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tracking") / "mlflow.db"


@pytest.fixture(scope="module")
def tracker(db: Path) -> Tracker:
    """One database for the module: creating its tables takes 1-2 s."""
    return Tracker.for_experiment(f"sqlite:///{db}", EXPERIMENT)


@pytest.fixture(scope="module")
def parent(tracker: Tracker) -> str:
    return tracker.client.create_run(tracker.experiment_id, run_name="tracking-tests").info.run_id


@pytest.fixture
def run_id(tracker: Tracker, parent: str, request: pytest.FixtureRequest) -> str:
    """A fresh stage run per test, named after the test."""
    tags = {"mlflow.parentRunId": parent}
    return tracker.client.create_run(tracker.experiment_id, run_name=request.node.name[:60], tags=tags).info.run_id


def _logger(tracker: Tracker, run_id: str, write_interval_s: float = 2.0) -> RunLogger:
    return RunLogger(tracker.client, run_id, tracker.experiment_id, write_interval_s)


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """`fn()` on a helper thread: fails the test if it has not returned after `seconds` (a hang), else
    returns its value or re-raises its exception here."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    helper = threading.Thread(target=call, name="test-deadline", daemon=True)
    helper.start()
    helper.join(seconds)
    assert not helper.is_alive(), f"{fn} did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


def _writers(run_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"mlflow-{run_id[:8]}"]


# ------------------------------------------------------------------------------ metric writer
def test_metrics_logged_from_the_callers_thread_arrive_with_their_steps_and_values(
    tracker: Tracker, run_id: str
) -> None:
    logger = _logger(tracker, run_id)
    for step in range(1, 21):
        logger.log_metrics({"train/loss": 1.0 / step, "lr": step * 1e-3}, step=step)
    _within(10, logger.flush)
    assert _history(tracker, run_id, "train/loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 21)]
    assert _history(tracker, run_id, "lr") == [(s, pytest.approx(s * 1e-3)) for s in range(1, 21)]


def test_flush_waits_for_every_metric_even_beyond_one_batch(tracker: Tracker, run_id: str) -> None:
    """With a 30 s write interval only flush() can have written them: 2500 metrics, three log_batch calls."""
    logger = _logger(tracker, run_id, write_interval_s=30)
    for step in range(2500):
        logger.log_metrics({"train/loss": step * 0.5}, step=step)
    time.sleep(0.5)  # ample time for a writer that did not wait for its interval
    assert _history(tracker, run_id, "train/loss") == [], "the writer stored before its interval ended"
    _within(15, logger.flush)  # ends the writer's 30 s wait instead of sitting it out
    assert _history(tracker, run_id, "train/loss") == [(step, step * 0.5) for step in range(2500)]


@pytest.mark.parametrize(
    ("deleted", "cause"),
    [
        (False, r"Run with id=\w+ not found"),
        (True, r"The run \w+ must be in the 'active' state\. Current state is deleted"),
    ],
    ids=["unknown run", "run deleted while its metrics wait"],
)
def test_a_failing_write_surfaces_from_flush_as_a_tracking_error(
    tracker: Tracker, run_id: str, deleted: bool, cause: str
) -> None:
    logged_to = run_id if deleted else uuid.uuid4().hex  # a run id nobody created
    logger = _logger(tracker, logged_to, write_interval_s=30)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    if deleted:
        tracker.client.delete_run(run_id)
    failure = rf"^tracking\.uri: logging metrics of run {logged_to} failed \({cause}"
    with pytest.raises(TrackingError, match=failure):
        _within(10, logger.flush)
    with pytest.raises(TrackingError, match=failure):  # the next metrics are not sent into a failed run
        logger.log_metrics({"train/loss": 1.0}, step=3)
    _within(10, lambda: logger.close(raise_failure=False))
    assert not _writers(logged_to), "the writer thread outlived the run"


def test_one_writer_thread_per_run_lives_until_the_run_closes(tracker: Tracker, run_id: str) -> None:
    logger = _logger(tracker, run_id)
    assert not _writers(run_id), "no thread before the first metric"
    logger.log_metrics({"val/loss": 0.9}, step=1)
    first = _writers(run_id)
    assert len(first) == 1 and first[0].is_alive()
    _within(10, logger.flush)
    logger.log_metrics({"val/loss": 0.7}, step=2)
    assert _writers(run_id) == first, "the same thread serves later metrics"
    _within(10, logger.close)
    assert not _writers(run_id) and not first[0].is_alive()
    assert _history(tracker, run_id, "val/loss") == [(1, 0.9), (2, 0.7)]


def test_flush_without_metrics_starts_no_thread(tracker: Tracker, run_id: str) -> None:
    logger = _logger(tracker, run_id)
    _within(5, logger.flush)
    assert not _writers(run_id)
    assert tracker.client.get_run(run_id).data.metrics == {}


# ------------------------------------------------------------------------- params, artifacts
def test_log_params_stores_more_than_one_batch_of_params(tracker: Tracker, run_id: str) -> None:
    params = {f"model.layer{i:03d}": i for i in range(250)} | {"data.path": "x" * 7000}
    _logger(tracker, run_id).log_params(params)
    stored = tracker.client.get_run(run_id).data.params
    assert len(stored) == 251
    assert {k: v for k, v in stored.items() if k != "data.path"} == {f"model.layer{i:03d}": str(i) for i in range(250)}
    assert stored["data.path"] == "x" * 6000, "a value is cut at MLflow's 6000-character limit"


def test_set_tags_stores_more_than_one_batch_of_tags(tracker: Tracker, run_id: str) -> None:
    tags = {f"trainflow.tag{i:03d}": f"value {i}" for i in range(150)}
    _logger(tracker, run_id).set_tags(tags)
    stored = tracker.client.get_run(run_id).data.tags
    assert {k: v for k, v in stored.items() if k.startswith("trainflow.tag")} == tags


def test_an_sqlite_experiment_keeps_its_artifacts_beside_the_database(
    tracker: Tracker, run_id: str, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not where the run starts: where the database is
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.artifact_location == (db.parent / "mlruns").as_uri()
    assert Tracker.for_experiment(f"sqlite:///{db}", EXPERIMENT).experiment_id == tracker.experiment_id

    _logger(tracker, run_id).log_dict({"accuracy": 0.5}, "result.json")
    stored = db.parent / "mlruns" / run_id / "artifacts" / "result.json"
    assert json.loads(stored.read_text()) == {"accuracy": 0.5}
    assert not list(tmp_path.iterdir()), "nothing written to the working folder"


# ------------------------------------------------------------------------------ run lifecycle
def _run(tracker: Tracker, run_id: str) -> Any:
    return tracker.client.get_run(run_id)


def test_a_run_ends_finished_with_its_params_and_metrics_stored(tracker: Tracker, parent: str) -> None:
    with tracker.run("stage", parent, params={"train": {"max_epochs": 3}}) as run:
        run.log_metrics({"val/loss": 0.5}, step=1)
        assert _run(tracker, run.run_id).info.status == "RUNNING"
    stored = _run(tracker, run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"train": "{'max_epochs': 3}"}
    assert stored.data.tags["mlflow.parentRunId"] == parent and stored.data.tags[STAGE_TAG] == "stage"
    assert stored.data.metrics == {"val/loss": 0.5}
    assert not _writers(run.run_id)


@pytest.mark.parametrize(
    ("error", "status"),
    [(ValueError("bad value"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (SystemExit(143), "KILLED")],
    ids=["exception", "ctrl-c", "signal"],
)
def test_a_run_left_by_an_exception_ends_failed_or_killed_with_the_error_tagged(
    tracker: Tracker, parent: str, error: BaseException, status: str
) -> None:
    with pytest.raises(type(error)), tracker.run("stage", parent) as run:
        run.log_metrics({"train/loss": 1.0}, step=1)
        raise error
    stored = _run(tracker, run.run_id)
    assert stored.info.status == status
    assert stored.data.tags[ERROR_TAG] == f"{type(error).__name__}: {error}"
    assert stored.data.metrics == {"train/loss": 1.0}, "the metrics logged before the error are stored"


def test_a_body_may_end_its_run_killed_and_children_nest_under_it(tracker: Tracker, parent: str) -> None:
    with tracker.run("hpo_search", parent) as stage, stage.child("trial-0", {"model.dropout": 0.1}) as trial:
        trial.end_status = "KILLED"  # a pruned trial
    assert _run(tracker, trial.run_id).info.status == "KILLED"
    assert _run(tracker, trial.run_id).data.tags["mlflow.parentRunId"] == stage.run_id
    assert _run(tracker, stage.run_id).info.status == "FINISHED"


def test_a_re_opened_run_runs_again_under_its_new_parent(tracker: Tracker, run_id: str) -> None:
    tracker.client.set_terminated(run_id, status="KILLED")
    new_parent = tracker.client.create_run(tracker.experiment_id).info.run_id
    with tracker.run("train", new_parent, run_id=run_id) as run:
        assert run.run_id == run_id
        assert _run(tracker, run_id).info.status == "RUNNING"
    assert _run(tracker, run_id).data.tags["mlflow.parentRunId"] == new_parent
    assert _run(tracker, run_id).info.status == "FINISHED"


def test_a_password_in_any_value_is_masked_in_what_a_run_stores(tracker: Tracker, parent: str, db: Path) -> None:
    url = "postgresql://tf:s3cret-pw@db.example:5432/optuna"
    with tracker.run(f"digits tune.hpo.storage={url}", parent, params={"tune.hpo.storage": url}) as run:
        run.set_tags({"trainflow.note": f"storage {url} unreachable"})
        run.log_dict({"storage": url, "nested": [{"uri": url}]}, "result.json")
    stored = _run(tracker, run.run_id)
    masked = "postgresql://tf:***@db.example:5432/optuna"
    assert stored.info.run_name == f"digits tune.hpo.storage={masked}"
    assert stored.data.params["tune.hpo.storage"] == masked
    assert stored.data.tags["trainflow.note"] == f"storage {masked} unreachable"
    result = db.parent / "mlruns" / run.run_id / "artifacts" / "result.json"
    assert json.loads(result.read_text()) == {"storage": masked, "nested": [{"uri": masked}]}
    assert b"s3cret-pw" not in db.read_bytes() + result.read_bytes()


# ----------------------------------------------------------------------------- pipeline runs
def test_the_unfinished_pipeline_run_of_a_config_is_the_one_a_re_run_continues(tracker: Tracker) -> None:
    sha, other_sha = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    assert tracker.unfinished_pipeline_run(sha) is None
    with pytest.raises(RuntimeError), tracker.run("first", tags={PIPELINE_TAG: "true", CONFIG_TAG: sha}) as first:
        raise RuntimeError("crashed")
    assert tracker.unfinished_pipeline_run(sha) == first.run_id, "a FAILED run is continued"
    assert tracker.unfinished_pipeline_run(other_sha) is None, "another config gets its own run"
    with tracker.run("again", run_id=first.run_id):
        pass
    assert tracker.unfinished_pipeline_run(sha) is None, "a FINISHED run is never reopened"


def test_the_code_version_hashes_every_stage_source_file() -> None:
    """The stage cache's key holds the code version: it must cover core/ and tasks/, or an edit would be cached."""
    from trainflow.core.storage.version import code_version, source_files

    root = Path(__file__).resolve().parents[2]
    names = {path.relative_to(root).as_posix() for path in source_files()}
    assert {"core/compress.py", "core/storage/version.py", "core/training/trainer.py", "tasks/train.py"} <= names
    assert names == {
        p.relative_to(root).as_posix() for folder in ("core", "tasks") for p in (root / folder).rglob("*.py")
    }
    assert code_version() != hashlib.sha256().hexdigest()[:16], "the hash of nothing"


def test_a_fluent_block_leaves_an_unset_tracking_uri_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restored as it was: set back to the default instead, it would win over a later call's `tracking_uri=`
    (download_artifacts of a models:/ URI then looked in the wrong database)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from trainflow.core.tracking.backend import fluent_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    with fluent_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        assert tracking_utils.is_tracking_uri_set()
    assert not tracking_utils.is_tracking_uri_set()
