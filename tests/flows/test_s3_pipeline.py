"""The whole pipeline with `store.uri: s3://...` on moto's server (real HTTP on loopback): it completes,
what it published in the bucket matches its manifest, and a second identical run is all cached."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flows.test_pipeline import STAGES, Project
from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import StoreConfig
from trainflow.core.publish import verify_manifest
from trainflow.core.storage.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
BUCKET, PREFIX = "trainflow-pipeline", "team/runs"


class S3Project(Project):
    """The Project of test_pipeline.py with its store in a bucket and the store's cache in its folder."""

    def __init__(self, root: Path, endpoint: str):
        super().__init__(root)
        self.store = {"uri": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": endpoint, "cache_dir": str(root / "cache"),
                      "multipart_threshold_mb": 5}  # fmt: skip
        raw = yaml.safe_load(self.config.read_text()) | {"store": self.store,
                                                          "publish": {"registered_model_name": "s3-wine"}}  # fmt: skip
        self.config.write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> S3Project:  # noqa: F811
    new_bucket(s3_endpoint, BUCKET)
    return S3Project(tmp_path_factory.mktemp("s3-pipeline"), s3_endpoint)


@pytest.fixture(scope="module")
def first(project: S3Project) -> dict[str, Any]:
    return project.run()


def test_the_pipeline_runs_on_an_s3_store(project: S3Project, first: dict[str, Any]) -> None:
    assert list(first["stages"]) == STAGES
    assert not any(stage["cached"] for stage in first["stages"].values())
    assert first["store_uri"] == f"s3://{BUCKET}/{PREFIX}"
    for uri in (first["stages"]["prepare_data"]["uri"], first["stages"]["train"]["checkpoint_uri"]):
        assert uri.startswith(f"s3://{BUCKET}/{PREFIX}/")
    assert not (project.root / "artifacts").exists(), "nothing went to a local store"


def test_the_registered_version_has_its_aliases_and_points_at_the_s3_manifest(
    project: S3Project, first: dict[str, Any]
) -> None:
    from mlflow import MlflowClient

    published = first["stages"]["publish"]
    client = MlflowClient(project.tracking_uri)
    version = client.get_model_version("s3-wine", str(published["registered_version"]))
    assert sorted(version.aliases) == ["candidate", "champion"] == sorted(published["aliases"])
    assert version.tags["trainflow.manifest_uri"] == published["manifest_uri"]
    assert published["manifest_uri"].startswith(f"s3://{BUCKET}/{PREFIX}/published/")
    assert version.tags["trainflow.data_fingerprint"] == first["stages"]["prepare_data"]["fingerprint"]


def test_the_objects_in_the_bucket_match_the_published_manifest(
    project: S3Project,
    first: dict[str, Any],
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    client = s3_client(s3_endpoint)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")["Contents"]
    sizes = {o["Key"]: o["Size"] for o in listed}
    publish = first["stages"]["publish"]
    manifest_key = publish["manifest_uri"].removeprefix(f"s3://{BUCKET}/")
    folder = manifest_key.rsplit("/", 1)[0]
    manifest = yaml.safe_load(client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    assert manifest["files"]
    for entry in manifest["files"]:
        key = f"{folder}/{entry['path']}"
        head = client.head_object(Bucket=BUCKET, Key=key)
        assert (sizes[key], head["Metadata"]["sha256"]) == (entry["bytes"], entry["sha256"])
    for o in publish["objects"]:
        key = o["uri"].removeprefix(f"s3://{BUCKET}/")
        assert (sizes[key], client.head_object(Bucket=BUCKET, Key=key)["Metadata"]["sha256"]) == (
            o["bytes"],
            o["sha256"],
        )
    assert all("sha256" in client.head_object(Bucket=BUCKET, Key=key)["Metadata"] for key in sizes)

    elsewhere = open_store(StoreConfig(**project.store | {"cache_dir": str(tmp_path / "fresh-cache")}))
    assert verify_manifest(publish["manifest_uri"], elsewhere) == []  # downloaded into an empty cache, re-hashed
    assert (tmp_path / "fresh-cache" / "s3" / BUCKET / folder / "model.pt").is_file()


def test_a_second_identical_run_reuses_every_stage(project: S3Project, first: dict[str, Any]) -> None:
    second = project.run(out="out2")
    assert [name for name, stage in second["stages"].items() if stage["cached"]] == STAGES
    assert second["stages"]["publish"]["manifest_uri"] == first["stages"]["publish"]["manifest_uri"]


def test_a_second_machine_on_the_same_bucket_gets_cached_stages(
    project: S3Project,
    first: dict[str, Any],
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Empty working folder, empty store cache, fresh Prefect result location: the records in the bucket
    alone make every stage `Cached` (same tracking server). A fresh MLflow database re-runs publish only
    (its record names a registered model version that database lacks); a record whose artifact is gone
    re-runs its stage, which reads its inputs into the empty cache through verified downloads."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    client = s3_client(s3_endpoint)
    records = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/.cache/prefect/")["Contents"]
    assert len(records) >= len(STAGES)
    shared = _machine(tmp_path / "shared", s3_endpoint, project.tracking_uri)
    fresh = _machine(tmp_path / "fresh", s3_endpoint, None)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        second = shared.run()
        assert [name for name, stage in second["stages"].items() if stage["cached"]] == STAGES
        publish = second["stages"]["publish"]
        assert publish["manifest_uri"] == first["stages"]["publish"]["manifest_uri"]
        assert verify_manifest(publish["manifest_uri"], open_store(StoreConfig(**shared.store))) == []

        own_db = fresh.run()
        assert [name for name, stage in own_db["stages"].items() if not stage["cached"]] == ["publish"]
        assert (
            verify_manifest(own_db["stages"]["publish"]["manifest_uri"], open_store(StoreConfig(**fresh.store))) == []
        )

        checkpoint = second["stages"]["train"]["checkpoint_uri"].removeprefix(f"s3://{BUCKET}/")
        client.delete_object(Bucket=BUCKET, Key=checkpoint)
        shutil.rmtree(tmp_path / "shared" / "cache")
        third = shared.run(out="out3")
    assert not list((tmp_path / "prefect-results").rglob("*")), "records went to the bucket, not here"
    assert not third["stages"]["train"]["cached"] and third["stages"]["prepare_data"]["cached"]
    assert client.head_object(Bucket=BUCKET, Key=checkpoint)["ContentLength"] > 0


def _machine(root: Path, endpoint: str, tracking_uri: str | None) -> S3Project:
    """Another machine's working folder on the same bucket; its own MLflow database unless one is shared."""
    root.mkdir()
    machine = S3Project(root, endpoint)
    if tracking_uri is not None:
        raw = yaml.safe_load(machine.config.read_text())
        machine.config.write_text(yaml.safe_dump(raw | {"tracking": raw["tracking"] | {"uri": tracking_uri}}))
    return machine


def test_the_verify_command_checks_a_manifest_in_the_bucket(
    project: S3Project, first: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from trainflow.flows.cli import main

    manifest = first["stages"]["publish"]["manifest_uri"]
    assert main(["verify", manifest, "--config", str(project.config)]) == 0
    assert capsys.readouterr().out.strip() == f"{manifest}: every file matches its sha256 and size"
    assert main(["verify", manifest.replace("manifest.json", "missing.json"), "--config", str(project.config)]) == 2
    assert "manifest not found" in capsys.readouterr().err
