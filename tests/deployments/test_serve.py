"""`trainflow serve` against Prefect's test server: the deployments it registers, their schedule, the dataset
event starting a run with the config's parameters, one run at a time per config, and cancellation.

One real `trainflow serve` process serves two configs for the whole module; its flow runs are real
subprocesses started by Prefect's runner.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import REPO, tiny_raw
from trainflow.core.training.checkpoint import load_checkpoint, periodic_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
CRON = "0 3 * * *"
QUICK = {"compress": {"enabled": False}, "train": {"max_epochs": 2}}
SLOW = {  # 24 epochs of 25 steps at >= 20 ms each: >= 12 s of training, time to see it running and cancel it
    "data": {"source": "sklearn", "name": "breast_cancer"},
    "model": {"name": "factory", "factory": "tests.core.factories:paced_net", "params": {"seconds": 0.02}},
    "train": {"max_epochs": 24, "early_stopping": {"enabled": False}, "checkpoint": {"every_steps": 100000}},
    "compress": {"enabled": False},
}


@dataclass
class Served:
    root: Path
    env: dict[str, str]
    configs: dict[str, Path]
    process: subprocess.Popen[str]

    def raw(self, name: str) -> dict[str, Any]:
        return yaml.safe_load(self.configs[name].read_text())


def _write_config(root: Path, name: str, sections: dict[str, Any]) -> Path:
    raw = (
        tiny_raw(**{k: v for k, v in sections.items() if k != "model"})
        | {"model": sections.get("model")}
        | {
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": name},
            "store": {"uri": str(root / f"artifacts-{name}")},
        }
    )
    raw["model"] = raw["model"] or tiny_raw()["model"]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait(what: str, probe: Callable[[], Any], timeout: float = 120.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _runs(deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client() as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def _state(run_id: Any) -> str:
    with _client() as client:
        return client.read_flow_run(run_id).state.name


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("served")
    configs = {"quick": _write_config(root, "quick", QUICK), "slow": _write_config(root, "slow", SLOW)}
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}  # fmt: skip
    command = [sys.executable, "-m", "trainflow", "serve", str(configs["quick"]), str(configs["slow"]),
               "--cron", CRON, "--out", str(root / "out")]  # fmt: skip
    log = (root / "serve.log").open("w")
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        _wait("the served deployments", lambda: process.poll() is not None or _deployment("slow"), timeout=90)
        assert process.poll() is None, (root / "serve.log").read_text()
        yield Served(root, env, configs, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _deployment(name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        with _client() as client:
            return client.read_deployment_by_name(f"training_pipeline/{name}")
    except ObjectNotFound:
        return None


def test_each_config_is_a_deployment_with_its_parameters_schedule_and_limit(served: Served) -> None:
    deployment = _deployment("quick")
    assert deployment.parameters == {"config_path": str(served.configs["quick"]), "overrides": [],
                                     "out_dir": str(served.root / "out" / "quick")}  # fmt: skip
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert {"trainflow", "quick"} <= set(deployment.tags)


def test_the_schedule_creates_its_runs_at_the_cron_times(served: Served) -> None:
    from prefect.client.schemas.objects import StateType

    deployment = _deployment("slow")
    with _client() as client:  # what Prefect's scheduler service does on a real server (the test server runs none)
        client._client.post(f"/deployments/{deployment.id}/schedule", json={"max_runs": 3, "min_runs": 3})
    scheduled = [run for run in _runs("slow") if run.state.type == StateType.SCHEDULED]
    assert len(scheduled) == 3
    for run in scheduled:
        assert (run.expected_start_time.hour, run.expected_start_time.minute) == (3, 0)
    starts = sorted(run.expected_start_time.timestamp() for run in scheduled)
    assert {later - earlier for earlier, later in itertools.pairwise(starts)} == {86400.0}  # daily
    with _client() as client:  # they are not due for hours; out of the way of the other tests
        for run in scheduled:
            client.delete_flow_run(run.id)


def test_the_dataset_event_runs_each_config_on_it_and_a_second_run_waits_its_turn(served: Served) -> None:
    from prefect.deployments import run_deployment

    emitted = subprocess.run([sys.executable, "-m", "trainflow", "emit-dataset-updated", "sklearn:wine"],
                             env=served.env, cwd=served.root, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert emitted.returncode == 0, emitted.stderr
    assert "sent trainflow.dataset.updated for sklearn:wine" in emitted.stdout
    first = _wait("a run started by the event", lambda: _runs("quick"), timeout=60)[0]
    assert first.parameters == _deployment("quick").parameters
    _wait("the first run to start", lambda: _state(first.id) in ("Running", "Completed"), timeout=120)
    second = run_deployment("training_pipeline/quick", timeout=0)
    waiting = _wait("the second run held back", lambda: _state(second.id) == "AwaitingConcurrencySlot"
                    or (_state(first.id) == "Completed" and "first done"))  # fmt: skip
    assert waiting is True, "the second run did not wait while the first ran"
    for run in (first, second):
        _wait(f"run {run.name} to complete", lambda run=run: _state(run.id) in ("Completed", "Failed", "Crashed"))
        assert _state(run.id) == "Completed", (served.root / "serve.log").read_text()[-3000:]
    assert (served.root / "out" / "quick" / "summary.json").is_file()
    assert [run.name for run in _runs("slow")] == []  # breast_cancer's config is not triggered by wine's event


def test_cancelling_a_training_leaves_a_checkpoint_the_rerun_resumes_to_the_same_weights(served: Served) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from trainflow.flows.pipeline import training_pipeline

    run = run_deployment("training_pipeline/slow", timeout=0)

    def training() -> bool:
        with _client() as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        return any(t.name.startswith("train-") and t.state and t.state.name == "Running" for t in tasks)

    _wait("the served run to be training", training, timeout=120)
    time.sleep(3)  # some steps in
    with _client() as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    _wait("the run to be cancelled", lambda: _state(run.id) in ("Cancelled", "Completed", "Failed", "Crashed"))
    assert _state(run.id) == "Cancelled"
    store = served.root / "artifacts-slow" / "stages" / "train"
    [folder] = list(store.iterdir())
    [checkpoint] = periodic_checkpoints(folder)  # written on the cancel's SIGTERM (every_steps is out of reach)
    step = load_checkpoint(checkpoint)["state"]["step"]
    assert not (folder / "model.pt").exists()

    config = str(served.configs["slow"])
    resumed = training_pipeline(config, [], str(served.root / "out-resumed"))["stages"]["train"]
    reference = training_pipeline(config, [f"store.uri={served.root / 'reference'}"], None)["stages"]["train"]
    assert resumed["resumed_from_step"] == step and 0 < step < reference["steps"]
    weights = load_checkpoint(folder / "model.pt")["model"]
    [reference_folder] = list((served.root / "reference" / "stages" / "train").iterdir())
    for name, tensor in load_checkpoint(reference_folder / "model.pt")["model"].items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)
