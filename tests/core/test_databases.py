"""PostgreSQL as a backend, against a real server (tests/postgres.py): the study and MLflow run on it, and the
preflight catches each way a database URL goes wrong before any stage, in one line, within seconds."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from tests.conftest import tiny_raw
from tests.postgres import PASSWORD, PostgresCluster, postgres  # noqa: F401
from tests.test_cli import listing, trainflow
from trainflow.core.config import config_from_dict
from trainflow.core.errors import ConfigError
from trainflow.core.storage.databases import check_database, prefect_database_url
from trainflow.core.tracking.runs import Tracker
from trainflow.core.tuning.study import rdb_storage


@pytest.fixture(scope="module")
def databases(postgres: PostgresCluster) -> dict[str, str]:  # noqa: F811
    return {name: postgres.create_database(f"checks_{name}") for name in ("optuna", "mlflow")}


def test_the_study_and_mlflow_run_on_postgresql(databases: dict[str, str], postgres: PostgresCluster) -> None:  # noqa: F811
    space = {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1}}
    config = config_from_dict(tiny_raw(tune={"hpo": {"enabled": True, "storage": databases["optuna"], "space": space}}))
    assert config.tune.hpo.storage is not None and PASSWORD not in config.tune.hpo.storage
    storage = rdb_storage(config.tune.hpo.storage, config.tune.hpo)
    study = optuna.create_study(study_name="on-postgres", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert len(optuna.load_study(study_name="on-postgres", storage=databases["optuna"]).trials) == 3

    tracker = Tracker.for_experiment(databases["mlflow"], "on-postgres")
    with tracker.run("a run", params={"storage": databases["optuna"]}) as run:
        run.log_metrics({"loss": 0.5}, step=1)
    stored = tracker.client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.metrics["loss"] == 0.5
    assert stored.data.params["storage"] == databases["optuna"].replace(PASSWORD, "***")
    assert PASSWORD.encode() not in postgres.dump("checks_mlflow")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda url: url.replace("postgresql://", "postgresql+psycopg2://"), "needs the psycopg2 driver"),
        (lambda url: url.replace(PASSWORD, "wrong-password"), 'password authentication failed for user "tf"'),
        (lambda url: url.replace("/checks_optuna", "/no_such_db"), 'database "no_such_db" does not exist'),
        (lambda url: url.rsplit(":", 1)[0] + ":1/checks_optuna", "Connection refused"),
    ],
    ids=["missing-driver", "wrong-password", "missing-database", "unreachable"],
)
def test_check_database_names_the_field_and_the_problem(databases: dict[str, str], change, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        check_database(change(databases["optuna"]), "tune.hpo.storage")
    message = str(caught.value)
    assert message.startswith("tune.hpo.storage: ") and reason in message and "\n" not in message
    assert PASSWORD not in message and "wrong-password" not in message


def test_prefects_driver_is_checked_and_its_url_rewritten(databases: dict[str, str]) -> None:
    url = prefect_database_url(databases["mlflow"])
    assert url.startswith("postgresql+asyncpg://")
    check_database(url, "--prefect-database")  # asyncpg is there; the login is checked through psycopg
    assert prefect_database_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("field", ["tune.hpo.storage", "tracking.uri"])
def test_a_run_with_a_wrong_password_stops_before_any_stage(
    field: str, databases: dict[str, str], tmp_path: Path
) -> None:
    """`trainflow run`: exit 2, one line naming the field, no password in it, within 10 s, nothing written."""
    url = databases["optuna" if field == "tune.hpo.storage" else "mlflow"].replace(PASSWORD, "wrong-Pa55")
    hpo = "tune: {hpo: {enabled: true, space: {optim.lr: {type: float, low: 0.001, high: 0.1}}}}\n"
    (tmp_path / "wine.yaml").write_text("data: {source: sklearn, name: wine}\nmodel: {name: mlp}\n" + hpo)
    before = listing(tmp_path)
    started = time.monotonic()
    done = trainflow(tmp_path, "run", "wine.yaml", "--set", f"{field}={url}")
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: cannot connect to postgresql://tf:***@"), lines
    assert "password authentication failed" in lines[0] and "wrong-Pa55" not in done.stderr + done.stdout
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert listing(tmp_path) == before, "nothing written"
