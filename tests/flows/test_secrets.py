"""Credentials are never written: a pipeline run on an S3 store with recognisable fake keys leaves them in
no log line, MLflow database or artifact, summary, Prefect database, result record or cached file; a password
in every database URL (MLflow, the study, Prefect's server, all on a real PostgreSQL) lands in no file, no
database dump, no output and no command line."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_raw
from tests.deployments.processes import PYTHON, cli_env, descendants
from tests.deployments.test_ui import read_until
from tests.flows.test_s3_pipeline import S3Project
from tests.postgres import PASSWORD, PostgresCluster, postgres  # noqa: F401
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


# ------------------------------------------------------------------------------------ passwords in database URLs
def _trainflow(cwd: Path, env: dict[str, str], *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([PYTHON, "-m", "trainflow", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, f"trainflow {' '.join(args[:2])}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _started_command_lines(parent: int) -> str:
    """The command lines of every process `parent` started (the servers, the flow runners, their workers): the
    user typed the parent's own."""
    import psutil

    lines = []
    for pid in descendants(parent):
        try:
            lines.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:  # exited meanwhile
            continue
    return "\n".join(lines)


def _wait_for_completed(api: str, flow_run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = http_get_json(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    return "TIMED OUT"


def http_get_json(url: str, body: dict[str, Any] | None = None) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with opener.open(request, timeout=30) as response:
        return json.loads(response.read())


def test_no_database_password_is_written_anywhere_nor_shown_by_ps(
    postgres: PostgresCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A password typed literally into every database URL: MLflow's (the YAML's tracking.uri, `trainflow ui
    --tracking-uri`, MLFLOW_TRACKING_URI for `compare`), the study's (`--set tune.hpo.storage`, also in a served
    deployment's parameters) and Prefect's server's (`--prefect-database`). The pipeline, a served run, `ui`,
    `compare` and `verify` run; then no file under the test's folders, no pg_dump of the three databases, no
    output and no process's command line holds the password, and a rotated password re-uses every stage."""
    urls = {name: postgres.create_database(f"secrets_{name}") for name in ("optuna", "mlflow", "prefect")}
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    env = cli_env(tmp_path, HOME=str(home), TMPDIR=str(tmp_path))  # PREFECT_HOME, ui logs: under tmp_path
    raw = tiny_raw(tune={"hpo": {"enabled": True, "n_trials": 3, "max_epochs_per_trial": 2, "pruner": "none",
                                 "space": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}}},
                   tracking={"uri": urls["mlflow"], "experiment": "secrets"}, store={"uri": "./artifacts"},
                   publish={"registered_model_name": "secrets-wine"})  # fmt: skip
    (project / "wine.yaml").write_text(yaml.safe_dump(raw))  # the password, literally, in the YAML
    storage = f"tune.hpo.storage={urls['optuna']}"
    outputs: list[str] = []
    ui = subprocess.Popen(
        [PYTHON, "-m", "trainflow", "ui", "--tracking-uri", urls["mlflow"], "--prefect-database", urls["prefect"],
         "--artifacts", str(tmp_path / "mlartifacts")],
        cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    serve = None
    try:
        printed = "\n".join(read_until(ui, "Ctrl-C", 180))
        outputs.append(printed)
        assert "postgresql://tf:***@" in printed, printed
        api = re.search(r"^export PREFECT_API_URL=(\S+)$", printed, re.MULTILINE).group(1)  # type: ignore[union-attr]
        assert "mlflow" in _started_command_lines(ui.pid), "the servers are seen"
        assert PASSWORD not in _started_command_lines(ui.pid), "a server's command line shows the password"
        env_api = env | {"PREFECT_API_URL": api}

        run = _trainflow(project, env_api, "run", "wine.yaml", "--set", storage, "--out", "out")
        outputs += [run.stdout, run.stderr]
        summary = json.loads((project / "out" / "summary.json").read_text())
        assert not any(stage["cached"] for stage in summary["stages"].values()), "every stage ran, every writer"

        serve = subprocess.Popen(
            [PYTHON, "-m", "trainflow", "serve", "wine.yaml", "--set", storage, "--no-trigger", "--out", "served"],
            cwd=project, env=env_api, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        outputs.append("\n".join(read_until(serve, "Ctrl-C stops serving", 120)))
        deadline = time.monotonic() + 60
        while not (deployments := http_get_json(f"{api}/deployments/filter", {})) and time.monotonic() < deadline:
            time.sleep(0.5)  # `serve` prints before it registers the deployment
        deployment = deployments[0]
        assert PASSWORD not in json.dumps(deployment["parameters"]) and "tf:${" in json.dumps(deployment["parameters"])
        flow_run = http_get_json(f"{api}/deployments/{deployment['id']}/create_flow_run", {})
        deadline = time.monotonic() + 60
        while "trainflow" not in _started_command_lines(serve.pid) and time.monotonic() < deadline:
            time.sleep(0.5)  # the runner's subprocess starts
        assert PASSWORD not in _started_command_lines(serve.pid) + _started_command_lines(ui.pid)
        assert _wait_for_completed(api, flow_run["id"], 240) == "COMPLETED"  # the runner resolved the reference
        served = json.loads((project / "served" / "wine" / "summary.json").read_text())
        assert all(stage["cached"] for stage in served["stages"].values() if stage)
        serve.send_signal(signal.SIGINT)
        outputs.append(serve.communicate(timeout=60)[0])

        manifest = summary["stages"]["publish"]["manifest_uri"].removeprefix("file://")
        outputs.append(_trainflow(project, env, "verify", manifest).stdout)
        compared = _trainflow(
            project, env | {"MLFLOW_TRACKING_URI": urls["mlflow"]}, "compare", "--experiment", "secrets"
        )
        outputs += [compared.stdout, compared.stderr]
        assert "tf:***@" in compared.stdout
    finally:
        for process in (serve, ui):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                outputs.append(process.communicate(timeout=60)[0] or "")

    rotated = "r0tated-Pa55word-9d1e"
    postgres.set_password(rotated)
    config = project / "wine.yaml"
    config.write_text(config.read_text().replace(PASSWORD, rotated))
    try:
        again = _trainflow(project, env, "run", "wine.yaml", "--set", storage.replace(PASSWORD, rotated),
                           "--out", "again")  # fmt: skip
        outputs += [again.stdout, again.stderr]
        rerun = json.loads((project / "again" / "summary.json").read_text())
        assert all(stage["cached"] for stage in rerun["stages"].values()), "a rotated password re-uses the cache"
        dumps = {name: postgres.dump(f"secrets_{name}") for name in urls}
    finally:
        postgres.set_password(PASSWORD)

    assert dumps["prefect"].count(b"training_pipeline") > 0 and b"trial-0" in dumps["mlflow"], "the dumps hold runs"
    config.unlink()  # the user's own file, the one place the user put the password
    control = tmp_path / "control.bin"
    control.write_bytes(b"header " + PASSWORD.encode() + b" trailer")
    assert _holders(tmp_path, PASSWORD.encode()) == [str(control)], "the scan finds a planted password"
    control.unlink()
    for needle in (PASSWORD, rotated):
        assert _holders(tmp_path, needle.encode()) == []
        assert [name for name, dump in dumps.items() if needle.encode() in dump] == []
        assert [i for i, text in enumerate(outputs) if needle in text] == []
