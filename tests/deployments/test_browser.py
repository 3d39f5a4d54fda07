"""The UIs `trainflow ui` starts, in a real browser, after a real pipeline run reported to them.

One `ui_servers` pair and one short run (HPO of 3 one-epoch trials, compression on, a registered model) serve
every test here. The run gets the two lines `trainflow ui` prints (PREFECT_API_URL, MLFLOW_TRACKING_URI):
that is the path users take, and its experiment is then created through the server, so the server's artifact
root is checked too. Screenshots land in each test's tmp_path and, when $TRAINFLOW_SCREENSHOTS names a
folder, there under stable names (mlflow-runs.png, mlflow-models.png, prefect-flow-run.png,
prefect-artifacts.png, prefect-compression.png).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.conftest import tiny_raw
from tests.deployments.browser import (
    click_if_present,
    headless_chromium,
    screenshot,
    text_xpath,
    wait_text,
    wait_visible,
)
from tests.deployments.processes import PYTHON, cli_env
from trainflow.deployments.servers import UiServers, ui_servers

pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e '.[dev]'")
from selenium.webdriver.common.by import By

pytestmark = pytest.mark.slow  # two servers and a browser: left out of `pytest -m 'not slow'`

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

CONFIG_NAME = "wine"  # the parent run's name, the experiment's, and the Prefect artifact keys' suffix
MODEL_NAME = "wine-mlp"
STAGES = ["prepare_data", "hpo_search", "train", "evaluate", "compress", "publish"]  # lr_range_test: skipped
ARTIFACT_KEYS = {  # kind -> keys (tasks/artifacts.py: <what>-<config name>)
    "table": ["hpo-trials-wine", "compression-wine"],
    "markdown": ["run-summary-wine"],
    "progress": ["train-progress-wine"],  # the train task run's
}


@dataclass(frozen=True)
class Reported:
    """The servers and what the pipeline run reported to them (its summary.json)."""

    servers: UiServers
    summary: dict[str, Any]
    root: Path
    output: str  # what `trainflow run` printed, stdout and stderr


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    yield from headless_chromium()  # asked for before `reported`: a missing browser skips before the servers start


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reported]:
    root = tmp_path_factory.mktemp("ui")
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
             "model.dropout": {"type": "float", "low": 0.0, "high": 0.3}}  # fmt: skip
    raw = tiny_raw(
        train={"max_epochs": 2},
        tune={"hpo": {"enabled": True, "n_trials": 3, "max_epochs_per_trial": 1, "space": space}},
        publish={"registered_model_name": MODEL_NAME},
        store={"uri": str(root / "artifacts")},
    )
    (root / f"{CONFIG_NAME}.yaml").write_text(yaml.safe_dump(raw))
    env = {"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with ui_servers(f"sqlite:///{root / 'mlflow.db'}", log_dir=root / "logs", env=env) as servers:
        run_env = cli_env(root, PREFECT_API_URL=servers.prefect_api_url, MLFLOW_TRACKING_URI=servers.mlflow_url)
        done = subprocess.run(
            [PYTHON, "-m", "trainflow", "run", f"{CONFIG_NAME}.yaml", "--out", "out"],
            cwd=root, env=run_env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        yield Reported(
            servers, json.loads((root / "out" / "summary.json").read_text()), root, done.stdout + done.stderr
        )


def test_the_run_reported_to_both_servers(reported: Reported) -> None:
    summary = reported.summary
    assert summary["mlflow_tracking_uri"] == reported.servers.mlflow_url
    assert list(summary["stages"]) == STAGES
    from mlflow import MlflowClient

    experiment = MlflowClient(reported.servers.mlflow_url).get_experiment(summary["mlflow_experiment_id"])
    assert experiment.name == CONFIG_NAME
    assert experiment.artifact_location == (reported.root / "mlruns" / experiment.experiment_id).as_uri()
    # on a server MLflow prints "View run <url>" and "View experiment <url>" for every run it ends, unless told not to
    assert "View run" not in reported.output and "View experiment" not in reported.output, reported.output[-3000:]


def test_mlflow_ui_shows_the_run_its_stage_runs_and_the_registered_model(
    browser: WebDriver, reported: Reported, tmp_path: Path
) -> None:
    summary, mlflow = reported.summary, reported.servers.mlflow_url
    # workflowType: the sidebar's "Model training" side (Runs, Models, Model registry), not its GenAI side
    browser.get(f"{mlflow}/#/experiments/{summary['mlflow_experiment_id']}/runs?workflowType=machine_learning")
    parent = run_row(browser, CONFIG_NAME)
    assert parent.get_attribute("row-id") == summary["mlflow_run_id"]
    close_assistant(browser)
    expand_row(parent)
    for stage in STAGES:
        wait_text(browser, stage)
    expand_row(run_row(browser, "hpo_search"))
    for trial in ("trial-0", "trial-1", "trial-2"):
        wait_text(browser, trial)
    wait_text(browser, MODEL_NAME)  # in the publish run's Models column
    screenshot(browser, tmp_path, "mlflow-runs.png")

    wait_text(browser, "Model registry").click()  # the sidebar's link
    wait_text(browser, "Registered Models")
    model = wait_text(browser, MODEL_NAME)
    dialog = "//div[@role='dialog']"  # "a new Model Registry UI", over the page; its mask fades out after it
    click_if_present(
        browser, f"{dialog}//button[@aria-label='Close']", f"{dialog} | //div[contains(@class, 'modal-mask')]"
    )
    click_if_present(browser, text_xpath("Model training"))  # the registry opens on the GenAI side of the sidebar
    close_assistant(browser)
    row = model.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").text
    assert "Version 1" in row and "champion" in row, row
    screenshot(browser, tmp_path, "mlflow-models.png")


def test_prefect_ui_shows_the_flow_run_and_its_task_runs(
    browser: WebDriver, reported: Reported, tmp_path: Path
) -> None:
    flow_run = reported.summary["prefect_flow_run_id"]
    browser.get(f"{reported.servers.prefect_url}/runs/flow-run/{flow_run}")
    wait_text(browser, f"{CONFIG_NAME}.yaml")  # the flow run's name
    wait_text(browser, "Completed")
    wait_text(browser, "Task Runs").click()
    for stage in [*STAGES, "lr_range_test"]:
        wait_text(browser, f"{stage}-", exact=False)  # task runs are named <task>-<3 hex>
    wait_text(browser, "Skipped")  # lr_range_test, with its reason in the logs
    screenshot(browser, tmp_path, "prefect-flow-run.png")


def test_prefect_ui_shows_the_hpo_compression_and_summary_artifacts(
    browser: WebDriver, reported: Reported, tmp_path: Path
) -> None:
    """Expects, on the flow run's Artifacts tab, the table artifacts `hpo-trials-wine` and `compression-wine`, the
    Markdown artifact `run-summary-wine` and the train task run's progress artifact `train-progress-wine`, each
    card showing its type; then the compression table itself, with the recommended variant's row."""
    flow_run = reported.summary["prefect_flow_run_id"]
    browser.get(f"{reported.servers.prefect_url}/runs/flow-run/{flow_run}")
    wait_text(browser, "Artifacts").click()  # the tab (a ?tab= query is replaced by Logs on load)
    cards = {}
    for kind, keys in ARTIFACT_KEYS.items():
        for key in keys:
            cards[key] = wait_text(browser, key)
            card_text = cards[key].find_element(By.XPATH, "./ancestor::*[contains(., 'Created')][1]").text
            assert kind.upper() in card_text, card_text
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cards["compression-wine"])
    screenshot(browser, tmp_path, "prefect-artifacts.png")

    cards["compression-wine"].click()
    recommended = reported.summary["stages"]["compress"]["recommended"]
    wait_text(browser, f"{recommended} (recommended)")
    wait_text(browser, "fp32")
    screenshot(browser, tmp_path, "prefect-compression.png")


def close_assistant(browser: WebDriver) -> None:
    """Close the MLflow Assistant side panel, open by default in a new browser profile."""
    click_if_present(browser, "//button[@aria-label='Close']")


def run_row(browser: WebDriver, name: str) -> WebElement:
    """The runs table's row of the run named `name` (ag-grid keeps its run id in `row-id`)."""
    return wait_visible(browser, f"//div[@role='row' and @row-id][.//*[normalize-space(.)='{name}']]", f"run {name}")


def expand_row(row: WebElement) -> None:
    """Show the child runs of a row: the +/- button in its Run Name cell."""
    row.find_element(By.XPATH, ".//div[contains(@col-id, 'Run Name')]//button").click()
