"""Credentials in a config (core/config/secrets.py): a literal URL password is hidden as a reference the moment
the config or a --set is read, so hashes and cache keys never change with it; `${VAR}` references are resolved
only where a connection is made, and a missing one is a preflight error naming the field and the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw
from trainflow.core.config import config_from_dict, load_config
from trainflow.core.config.secrets import HIDDEN_PREFIX, hide_passwords, mask_secrets, resolve
from trainflow.core.errors import ConfigError
from trainflow.core.preflight import preflight
from trainflow.core.tuning.study import rdb_storage

PASSWORD = "s3cr3t-Pa55-planted"
URL = f"postgresql://tf:{PASSWORD}@db.internal:5432/optuna"


def _hpo(storage: str, **extra: object) -> dict[str, object]:
    return {"hpo": {"enabled": True, "n_trials": 2, "storage": storage,
                    "space": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1}}, **extra}}  # fmt: skip


def test_a_literal_password_is_moved_into_the_environment_and_back_only_by_resolve() -> None:
    hidden = hide_passwords(f"connect to {URL} now")
    assert PASSWORD not in hidden and f"${{{HIDDEN_PREFIX}" in hidden
    assert resolve(hidden, "tune.hpo.storage") == f"connect to {URL} now"
    assert hide_passwords(URL.replace(PASSWORD, "rotated")) == hide_passwords(URL), "the name ignores the password"
    assert hide_passwords(URL.replace("db.internal", "db2")) != hide_passwords(URL), "another server, another name"
    assert hide_passwords(hidden) == hidden, "hiding twice changes nothing"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (URL, "postgresql://tf:***@db.internal:5432/optuna"),
        ("postgresql://tf:${PG_PASSWORD}@db/optuna", "postgresql://tf:${PG_PASSWORD}@db/optuna"),
        (f"postgresql://tf:${{{HIDDEN_PREFIX}0123456789}}@db/optuna", "postgresql://tf:***@db/optuna"),
        ("mysql+pymysql://u:p@host/db", "mysql+pymysql://u:***@host/db"),
        ("try https://user:pw@h/x and s3://b/k", "try https://user:***@h/x and s3://b/k"),
        ("sqlite:///x.db and http://host:5000/path", "sqlite:///x.db and http://host:5000/path"),
    ],
)
def test_masking_shows_a_users_reference_and_hides_passwords_and_hidden_ones(text: str, shown: str) -> None:
    assert mask_secrets(text) == shown


def test_a_rotated_password_keeps_the_config_hash_and_no_form_of_the_config_holds_it(tmp_path: Path) -> None:
    configs = []
    for password in (PASSWORD, "an0ther-r0tated-one"):
        path = tmp_path / f"{password}.yaml"
        path.write_text(yaml.safe_dump(tiny_raw(tune=_hpo(URL.replace(PASSWORD, password)))))
        configs.append(load_config(path))
    assert configs[0].sha256() == configs[1].sha256()
    assert PASSWORD not in configs[0].canonical_json() and PASSWORD not in repr(configs[0])
    rotated = URL.replace(PASSWORD, "an0ther-r0tated-one")
    assert resolve(configs[1].tune.hpo.storage or "", "tune.hpo.storage") == rotated


def test_a_password_in_a_set_is_hidden_as_the_command_line_is_parsed() -> None:
    from trainflow.flows.cli import _parser

    args = _parser().parse_args(["run", "config.yaml", "--set", f"tune.hpo.storage={URL}"])
    assert PASSWORD not in str(args.overrides) and args.overrides[0].startswith("tune.hpo.storage=postgresql://tf:${")


def test_an_unset_reference_is_a_preflight_error_naming_the_field_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TF_TEST_UNSET_PW", raising=False)
    config = config_from_dict(tiny_raw(tune=_hpo("postgresql://tf:${TF_TEST_UNSET_PW}@db/optuna")))
    with pytest.raises(ConfigError, match=r"^tune\.hpo\.storage: \$\{TF_TEST_UNSET_PW\} is not set in the environment"):
        preflight(config)


def test_a_reference_where_nothing_resolves_it_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_TEST_NAME", "x")
    config = config_from_dict(tiny_raw(tracking={"experiment": "${TF_TEST_NAME}"}))
    with pytest.raises(ConfigError, match=r"tracking\.experiment: \$\{TF_TEST_NAME\}: references are resolved only in"):
        preflight(config)


def test_a_password_in_the_artifact_location_is_refused_mlflow_would_store_it() -> None:
    config = config_from_dict(tiny_raw(tracking={"artifact_location": "https://u:pw@artifacts.internal/x"}))
    with pytest.raises(ConfigError, match=r"^tracking\.artifact_location: carries a password"):
        preflight(config)


def test_the_study_storage_resolves_its_reference_where_it_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_TEST_STUDY_DIR", str(tmp_path))
    storage = rdb_storage("sqlite:///${TF_TEST_STUDY_DIR}/study.db")
    storage.engine.dispose()
    assert (tmp_path / "study.db").is_file()


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("store", "endpoint_url", f"http://minio:{PASSWORD}@127.0.0.1:9000"),
     ("data", "path", f"https://u:{PASSWORD}@files.internal/table.csv")],
)  # fmt: skip
def test_a_password_where_no_connection_takes_one_is_refused_without_echoing_it(
    section: str, field: str, value: str, tmp_path: Path
) -> None:
    """boto3 takes no password in an endpoint (its chain supplies keys), and a data path is a file or s3:// object."""
    raw = tiny_raw()
    raw[section] = {"uri": "s3://bucket/prefix", field: value} if section == "store" else {
        "source": "csv", "path": value, "target": "y"}  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        preflight(load_config(path))
    assert f"{section}.{field}" in str(caught.value) and PASSWORD not in str(caught.value)
