"""The whole pipeline with its train stage on 2 gloo ranks (torch's elastic launcher, CPU): the train record
and MLflow show the data-parallel run, metrics come from the main rank only, and evaluate and publish
work on the weights the ranks trained. One pipeline run for the module (compress off: it would launch
its own fine-tunes)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from tests.flows.test_pipeline import Project
from trainflow.core.config import load_config
from trainflow.core.models import build_model
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import prepared_loaders
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.metrics import eval_pass
from trainflow.core.training.spec import TrainingSpec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
STAGES = ["prepare_data", "train", "evaluate", "publish"]
BATCH = 16  # tiny_raw's train.batch_size, per rank


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(
        tmp_path_factory.mktemp("ddp-pipeline"),
        train={"distributed": {"nproc_per_node": 2, "rdzv_endpoint": "localhost:0", "collective_timeout_s": 60}},
        compress={"enabled": False},
    )


@pytest.fixture(scope="module")
def summary(project: Project) -> dict[str, Any]:
    return project.run()


def test_the_pipeline_completes_with_a_two_rank_train_record(summary: dict[str, Any]) -> None:
    stages = summary["stages"]
    assert list(stages) == STAGES
    assert not any(stage["cached"] for stage in stages.values())
    trained = stages["train"]
    assert trained["world_size"] == 2
    assert trained["effective_batch_size"] == 2 * BATCH
    assert trained["micro_batch_size"] == BATCH
    assert trained["steps"] == 4 * trained["epochs_run"], "124 rows: 62 per rank, 4 micro-batches of 16 per epoch"
    assert trained["nonfinite_steps"] == 0
    assert trained["best_val_loss"] < 0.6


def test_mlflow_holds_the_main_ranks_training_metrics_once(project: Project, summary: dict[str, Any]) -> None:
    client = MlflowClient(project.tracking_uri)
    trained = summary["stages"]["train"]
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert run.data.params["effective_batch_size"] == str(2 * BATCH)
    log_steps = list(range(5, trained["steps"] + 1, 5))
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == log_steps, "one value per log point: the other rank logs nothing"
    wait = client.get_metric_history(run.info.run_id, "train/data_wait_fraction")
    assert sorted(m.step for m in wait) == log_steps
    assert all(0.0 <= m.value <= 1.0 for m in wait)
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == trained["epochs_run"]


def test_evaluate_and_publish_use_the_weights_the_ranks_trained(project: Project, summary: dict[str, Any]) -> None:
    store = LocalStore(project.root / "artifacts")
    stages = summary["stages"]
    weights_file = store.local_path(stages["train"]["checkpoint_uri"])
    published = {o["uri"].rsplit("/", 1)[1]: o for o in stages["publish"]["objects"]}
    assert published["model.pt"]["sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()

    # the test split scored again here with the trained weights: the evaluate stage's numbers
    config = load_config(str(project.config), [])
    data = prepare_data(config.data, config.seed, LocalStore(project.root / "again"))
    assert data.fingerprint == stages["prepare_data"]["fingerprint"]
    model = build_model(config.model, data.spec)
    model.load_state_dict(load_checkpoint(weights_file)["model"])
    loaders = prepared_loaders(TrainingSpec.of(config, data), LocalStore(project.root / "again"), BATCH)
    result = eval_pass(model, loaders.test, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    evaluated = stages["evaluate"]["metrics"]
    assert evaluated["loss"] == pytest.approx(result.loss, rel=1e-5)
    assert evaluated["accuracy"] == pytest.approx(result.correct / result.n_targets)
    assert evaluated["accuracy"] > 0.85
