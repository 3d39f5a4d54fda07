"""`tracking.artifact_location: s3://...`: a new MLflow experiment keeps its run artifacts in the bucket,
reached through store.endpoint_url (moto's server on loopback); config validation of the location."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_raw
from tests.flows.test_pipeline import Project
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import config_from_dict
from trainflow.core.errors import ConfigError
from trainflow.core.tracking import backend
from trainflow.core.tracking.backend import point_mlflow_s3_at
from trainflow.core.tracking.runs import Tracker

pytestmark = pytest.mark.slow  # MLflow artifacts in an S3 server: left out of `pytest -m 'not slow'`

BUCKET = "trainflow-tracking"
LOCATION = f"s3://{BUCKET}/mlflow"
ENV = "MLFLOW_S3_ENDPOINT_URL"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLFLOW_S3_ENDPOINT_URL during the test, and none left behind (setenv first records the original)."""
    monkeypatch.setenv(ENV, "placeholder")
    monkeypatch.delenv(ENV)
    monkeypatch.setattr(backend, "_endpoint_we_set", None)


@pytest.mark.usefixtures("prefect_server", "clean_env")
def test_a_new_experiment_keeps_its_artifacts_in_the_bucket(tmp_path: Path, s3_endpoint: str) -> None:  # noqa: F811
    new_bucket(s3_endpoint, BUCKET)
    project = Project(tmp_path, compress={"enabled": False})
    raw = yaml.safe_load(project.config.read_text())
    raw["tracking"]["artifact_location"] = LOCATION
    raw["store"] = {"uri": f"s3://{BUCKET}/store", "endpoint_url": s3_endpoint, "cache_dir": str(tmp_path / "cache")}
    project.config.write_text(yaml.safe_dump(raw))

    summary = project.run()

    parent = MlflowClient(project.tracking_uri).get_run(summary["mlflow_run_id"])
    assert parent.info.artifact_uri.startswith(f"{LOCATION}/")
    prefix = parent.info.artifact_uri.removeprefix(f"s3://{BUCKET}/")
    listed = s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    assert {"summary.json", "config.yaml"} <= {o["Key"].removeprefix(f"{prefix}/") for o in listed["Contents"]}
    assert os.environ[ENV] == s3_endpoint
    assert not (tmp_path / "mlruns").exists(), "no MLflow artifacts beside the database"


@pytest.mark.usefixtures("clean_env")
def test_the_users_own_endpoint_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    point_mlflow_s3_at("http://127.0.0.1:1")
    point_mlflow_s3_at("http://127.0.0.1:2")  # ours: may change
    assert os.environ[ENV] == "http://127.0.0.1:2"
    monkeypatch.setenv(ENV, "http://users-own:9000")
    point_mlflow_s3_at("http://127.0.0.1:3")
    assert os.environ[ENV] == "http://users-own:9000"


def test_an_existing_experiment_keeps_its_location(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker.for_experiment(uri, "kept", (tmp_path / "first").as_uri())
    with caplog.at_level(logging.WARNING, logger="trainflow.core.tracking.runs"):
        again = Tracker.for_experiment(uri, "kept", LOCATION)
    assert again.experiment_id == first.experiment_id
    assert again.client.get_experiment(again.experiment_id).artifact_location == (tmp_path / "first").as_uri()
    assert [r.message for r in caplog.records if r.name == "trainflow.core.tracking.runs"] == [
        f"tracking.artifact_location {LOCATION} not applied: experiment 'kept' exists and keeps its artifact "
        f"location {(tmp_path / 'first').as_uri()}"
    ]


def test_an_s3_artifact_location_needs_a_valid_bucket() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(tiny_raw(tracking={"artifact_location": "s3://Bad_Bucket/mlflow"}))
    assert len(caught.value.problems) == 1 and "\n" not in str(caught.value)
    assert str(caught.value).startswith(
        "config: tracking.artifact_location: 's3://Bad_Bucket/mlflow': bucket name 'Bad_Bucket'"
    )
    config = config_from_dict(tiny_raw(tracking={"artifact_location": f"{LOCATION}/"}))
    assert config.tracking.artifact_location == LOCATION
    assert config_from_dict(tiny_raw()).tracking.artifact_location is None
