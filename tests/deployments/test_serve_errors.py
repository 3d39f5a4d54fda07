"""Bad input to `trainflow serve` and `trainflow emit-dataset-updated`: one line each on stderr, exit 2, before
anything is registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw
from trainflow.flows.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    return path


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in captured.err
    return lines


def test_a_config_that_does_not_validate(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_raw(train={"max_epochs": 0})))
    assert _fails(["serve", str(config), str(bad)], capsys) == [f"error: {bad}: train.max_epochs: 0 must be >= 1"]


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("every night", "UTC", "error: --cron 'every night' --timezone UTC: Invalid cron string"),
        ("0 3 * * *", "Mars/Olympus", "error: --cron '0 3 * * *' --timezone Mars/Olympus: Invalid timezone"),
    ],
)
def test_a_bad_schedule(
    config: Path, cron: str, timezone: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    [line] = _fails(["serve", str(config), "--cron", cron, "--timezone", timezone], capsys)
    assert line.startswith(message)


def test_two_configs_with_one_name(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "elsewhere" / "ok.yaml"
    other.parent.mkdir()
    other.write_text(config.read_text())
    [line] = _fails(["serve", str(config), str(other)], capsys)
    assert "two files share a name" in line


@pytest.mark.parametrize("argv", [["serve", "{config}"], ["emit-dataset-updated", "sklearn:wine"]])
def test_no_prefect_server_to_serve_or_emit_to(
    argv: list[str], config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    argv = [arg.format(config=config) for arg in argv]
    with temporary_settings({PREFECT_API_URL: None}):
        [line] = _fails(argv, capsys)
    assert "needs a Prefect server that keeps running: start `trainflow ui`" in line
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        [line] = _fails(argv, capsys)
    assert line.startswith("error: PREFECT_API_URL http://127.0.0.1:9/api: no Prefect server answers")
