"""Credentials are never written: a pipeline run on an S3 store with recognisable fake keys leaves them in
no log line, MLflow database or artifact, summary, Prefect database, result record or cached file."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from mlflow import MlflowClient

from tests.flows.test_s3_pipeline import S3Project
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
KEY_ID, SECRET = "AKIAFAKEKEYID4TESTS77", "fAkE/SeCrEt+KeY/tr41nfl0w-never-written-42"
BUCKET = "trainflow-secrets"


def _holders(root: Path, needle: bytes) -> list[str]:
    """Every file under `root` whose bytes contain `needle`."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_no_credential_is_written_anywhere(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from prefect.settings import (
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
    )

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    new_bucket(s3_endpoint, BUCKET)
    project = S3Project(tmp_path, s3_endpoint)
    project.store["uri"] = f"s3://{BUCKET}/secrets"
    project.config.write_text(project.config.read_text().replace("trainflow-pipeline/team/runs", f"{BUCKET}/secrets"))
    caplog.set_level(logging.INFO)
    summary = project.run()
    assert not any(stage["cached"] for stage in summary["stages"].values()), "every stage ran, so every writer ran"

    out, err = capfd.readouterr()
    for needle in (KEY_ID, SECRET):
        assert needle not in caplog.text and needle not in out and needle not in err

    folders = [tmp_path, Path(str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()))]  # MLflow DB, summary, cache, config
    experiment = MlflowClient(project.tracking_uri).get_experiment_by_name("tests")
    artifacts = urlparse(experiment.artifact_location)
    if artifacts.scheme in ("", "file"):
        folders.append(Path(unquote(artifacts.path)))
    prefect_db = Path("/" + urlparse(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).path.lstrip("/"))
    assert prefect_db.is_file(), prefect_db
    folders.append(prefect_db.parent)  # the DB and its -wal/-shm files

    control = tmp_path / "control.bin"  # the scan itself must find a planted secret, or it proves nothing
    control.write_bytes(b"header " + SECRET.encode() + b" trailer")
    assert _holders(tmp_path, SECRET.encode()) == [str(control)]
    control.unlink()

    client = s3_client(s3_endpoint)
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any("/.cache/prefect/" in key for key in objects), "the stage records are in the bucket"
    for needle in (KEY_ID, SECRET):
        encoded = needle.encode()
        assert [h for folder in folders for h in _holders(folder, encoded)] == []
        assert [k for k in objects if encoded in client.get_object(Bucket=BUCKET, Key=k)["Body"].read()] == []
