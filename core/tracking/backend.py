"""Where MLflow is: the tracking URI a run uses, whether it answers, and the environment MLflow's own clients
read (the fluent API's URI, the S3 endpoint of its artifact repository, its console output)."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainflow.core.config.secrets import hide_passwords, mask_secrets, resolve
from trainflow.core.errors import TrackingError
from trainflow.core.storage.databases import check_database, is_database
from trainflow.core.storage.files import folder_problem

# What MLflow prints by default that a user of trainflow cannot act on (the run's summary says where its runs are).
# Each can be set otherwise in the environment.
QUIET_DEFAULTS = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # with a server: "View run ... View experiment ..." per run
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a progress bar per artifact download
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # INFO such as "Creating initial MLflow database tables..."
}


def quiet_mlflow() -> None:
    """MLflow's console defaults for this process (`QUIET_DEFAULTS`, where the environment sets nothing else): by
    the `trainflow` command before MLflow is imported (its logging level is read then), and by every flow run,
    also one a Prefect worker starts (URL printing and progress bars are read at each call)."""
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)


def tracking_uri(configured: str) -> str:
    """`MLFLOW_TRACKING_URI` from the environment wins over the config, as MLflow users expect. A password in it
    is hidden (`core.config.secrets`): `client_for` resolves it where the connection is made."""
    return hide_passwords(os.environ.get("MLFLOW_TRACKING_URI") or configured)


def client_for(uri: str) -> Any:
    """An MlflowClient on `uri`, its `${VAR}` references resolved here and nowhere else."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve(uri, "tracking.uri"))


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (`log_model`, `load_model`) at `uri` for a block, then put things back.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ, which would make one
    run's config look like the user's environment setting to every later run in this process.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    # the raw setting, None when never set: `mlflow.get_tracking_uri()` would give the default, and setting that
    # back would leave it "set", so a later `tracking_uri=` argument (download_artifacts of a models:/ URI) lost
    # to it; MLflow's own `_use_tracking_uri` restores the raw value the same way
    saved = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(resolve(uri, "tracking.uri"))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # type: ignore[arg-type]
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
        endpoint_url = resolve(endpoint_url, "store.endpoint_url")
        os.environ[_S3_ENDPOINT_ENV] = endpoint_url
    else:
        os.environ.pop(_S3_ENDPOINT_ENV, None)
    _endpoint_we_set = endpoint_url


def artifacts_beside(uri: str) -> str | None:
    """`file://<db folder>/mlruns` for `sqlite:///<path>`; None (MLflow's default) for servers."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def check_reachable(uri: str) -> None:
    """Preflight: the tracking backend can be written (SQLite folder), answers (HTTP server) or accepts our login
    (a database server: `core.storage.databases`)."""
    if is_database(uri):
        check_database(uri, "tracking.uri")
        return
    shown, uri = mask_secrets(uri), resolve(uri, "tracking.uri")
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
            reason = mask_secrets(str(exc))
            raise TrackingError(f"tracking.uri: MLflow server {shown} is not reachable ({reason})") from None
