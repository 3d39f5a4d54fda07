"""deployments/prefect.yaml (for `prefect deploy`, which has no dry run) checked the ways it can go wrong:
Prefect's own models, keys those models would silently ignore, entrypoints, parameters against the flows'
signatures, the configs it names, schedules, and triggers that name each config's dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from trainflow.core.config import load_config
from trainflow.core.data.sources import dataset_uri
from trainflow.deployments.definitions import DATASET_EVENT, check_cron, dataset_resource_id

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def test_prefect_reads_it_with_the_working_directory_from_the_environment(
    document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
    from prefect.utilities.templating import apply_values

    model = PrefectYamlModel.model_validate(document)
    assert len(model.deployments) == 5
    allowed = set(DeploymentConfig.model_fields)
    for deployment in document["deployments"]:
        assert set(deployment) <= allowed, f"{deployment['name']}: keys Prefect would ignore"
    monkeypatch.setenv("TRAINFLOW_DIR", str(REPO))
    [step] = document["pull"]
    assert apply_values(step, os.environ)["prefect.deployments.steps.set_working_directory"] == {"directory": str(REPO)}


def _deployments(document: dict[str, Any]) -> list[dict[str, Any]]:
    return document["deployments"]


def test_every_deployment_names_a_flow_its_parameters_fit_and_a_valid_config(document: dict[str, Any]) -> None:
    from prefect.flows import load_flow_from_entrypoint

    seen = set()
    for deployment in _deployments(document):
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        seen.add((flow.name, deployment["name"]))
        flow.validate_parameters(deployment["parameters"])  # raises on a missing or unknown parameter
        load_config(REPO / deployment["parameters"]["config_path"], deployment["parameters"]["overrides"])
        limit = deployment["concurrency_limit"]
        assert (limit["limit"], limit["collision_strategy"]) == (1, "ENQUEUE")
    assert len(seen) == len(_deployments(document)), "two deployments share flow and name"


def test_schedules_and_triggers_are_valid_and_name_the_configs_dataset(document: dict[str, Any]) -> None:
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    triggered = 0
    for deployment in _deployments(document):
        for schedule in deployment.get("schedules", []):
            check_cron(schedule["cron"], schedule["timezone"])
        config = load_config(REPO / Path(deployment["parameters"]["config_path"]))
        for raw in deployment.get("triggers", []):
            trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(raw)
            assert trigger.expect == {DATASET_EVENT}
            assert trigger.match.model_dump()["prefect.resource.id"] == dataset_resource_id(dataset_uri(config.data))
            triggered += 1
    assert triggered == 2
