"""MLflow tracking against real MLflow on a temporary SQLite file: the metric writer thread (what it stores,
when, how it fails and when it ends), params beyond one batch, where an experiment keeps its artifacts,
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
from trainflow.core.storage.tracking import CONFIG_TAG, PIPELINE_TAG, MlflowMetricLogger, Tracker

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
    return tracker.open_pipeline_run("f" * 64, "tracking-tests")


@pytest.fixture
def run_id(tracker: Tracker, parent: str, request: pytest.FixtureRequest) -> str:
    """A fresh stage run per test, named after the test."""
    return tracker.start_stage_run(parent, request.node.name[:60])


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
    logger = tracker.logger(run_id)
    for step in range(1, 21):
        logger.log_metrics({"train/loss": 1.0 / step, "lr": step * 1e-3}, step=step)
    _within(10, logger.flush)
    assert _history(tracker, run_id, "train/loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 21)]
    assert _history(tracker, run_id, "lr") == [(s, pytest.approx(s * 1e-3)) for s in range(1, 21)]


def test_flush_waits_for_every_metric_even_beyond_one_batch(tracker: Tracker, run_id: str) -> None:
    """With a 30 s write interval only flush() can have written them: 2500 metrics, three log_batch calls."""
    logger = MlflowMetricLogger(tracker.client, run_id, write_interval_s=30)
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
    logger = MlflowMetricLogger(tracker.client, logged_to, write_interval_s=30)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    if deleted:
        tracker.client.delete_run(run_id)
    with pytest.raises(TrackingError, match=rf"^tracking\.uri: logging metrics to run {logged_to} failed \({cause}"):
        _within(10, logger.flush)
    assert not _writers(logged_to), "the writer thread outlived the failed flush"
    _within(10, logger.flush)  # reported once, not again on the next flush


def test_the_writer_thread_ends_at_each_flush_and_a_new_one_serves_later_metrics(tracker: Tracker, run_id: str) -> None:
    logger = tracker.logger(run_id)
    assert not _writers(run_id), "no thread before the first metric"
    logger.log_metrics({"val/loss": 0.9}, step=1)
    first = _writers(run_id)
    assert len(first) == 1 and first[0].is_alive()
    _within(10, logger.flush)
    assert not _writers(run_id) and not first[0].is_alive()

    logger.log_metrics({"val/loss": 0.7}, step=2)
    second = _writers(run_id)
    assert len(second) == 1 and second[0] is not first[0]
    _within(10, logger.flush)
    assert not _writers(run_id) and not second[0].is_alive()
    assert _history(tracker, run_id, "val/loss") == [(1, 0.9), (2, 0.7)]


def test_flush_without_metrics_starts_no_thread(tracker: Tracker, run_id: str) -> None:
    logger = tracker.logger(run_id)
    _within(5, logger.flush)
    assert not _writers(run_id)
    assert tracker.client.get_run(run_id).data.metrics == {}


# ------------------------------------------------------------------------- params, artifacts
def test_log_params_stores_more_than_one_batch_of_params(tracker: Tracker, run_id: str) -> None:
    params = {f"model.layer{i:03d}": i for i in range(250)} | {"data.path": "x" * 7000}
    tracker.logger(run_id).log_params(params)
    stored = tracker.client.get_run(run_id).data.params
    assert len(stored) == 251
    assert {k: v for k, v in stored.items() if k != "data.path"} == {f"model.layer{i:03d}": str(i) for i in range(250)}
    assert stored["data.path"] == "x" * 6000, "a value is cut at MLflow's 6000-character limit"


def test_set_tags_stores_more_than_one_batch_of_tags(tracker: Tracker, run_id: str) -> None:
    tags = {f"trainflow.tag{i:03d}": f"value {i}" for i in range(150)}
    tracker.logger(run_id).set_tags(tags)
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

    tracker.logger(run_id).log_dict({"accuracy": 0.5}, "result.json")
    stored = db.parent / "mlruns" / run_id / "artifacts" / "result.json"
    assert json.loads(stored.read_text()) == {"accuracy": 0.5}
    assert not list(tmp_path.iterdir()), "nothing written to the working folder"


# ----------------------------------------------------------------------------- pipeline runs
def test_open_pipeline_run_continues_an_unfinished_run_of_the_same_config(tracker: Tracker) -> None:
    sha, other_sha = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    first = tracker.open_pipeline_run(sha, "first")
    tags = tracker.client.get_run(first).data.tags
    assert (tags[PIPELINE_TAG], tags[CONFIG_TAG]) == ("true", sha)
    assert tracker.open_pipeline_run(sha, "again") == first, "a RUNNING run (a crashed process) is continued"
    assert tracker.open_pipeline_run(other_sha, "other") != first, "another config gets its own run"

    tracker.end_run(first, status="FAILED")
    assert tracker.open_pipeline_run(sha, "after failure") == first
    assert tracker.client.get_run(first).info.status == "RUNNING", "the continued run is running again"

    tracker.end_run(first)
    fresh = tracker.open_pipeline_run(sha, "after success")
    assert fresh != first, "a FINISHED run is never reopened"
    assert tracker.client.get_run(first).info.status == "FINISHED"
    assert tracker.open_pipeline_run(sha, "again") == fresh


def test_a_resumed_stage_run_is_reopened_under_the_new_parent(tracker: Tracker, run_id: str) -> None:
    tracker.end_run(run_id, status="KILLED")
    new_parent = tracker.open_pipeline_run(uuid.uuid4().hex * 2, "resumed")
    assert tracker.start_stage_run(new_parent, "train", run_id=run_id) == run_id
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["mlflow.parentRunId"] == new_parent


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
