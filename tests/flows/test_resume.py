"""Crash-safe resume: `trainflow run` killed with SIGKILL mid-epoch, re-run, ends with the weights
of an uninterrupted run, logging into the same MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient

from trainflow.core.training.checkpoint import load_checkpoint, periodic_checkpoints

CONFIG = {
    "seed": 3,
    "data": {"source": "synthetic", "n_samples": 5000, "n_features": 32, "n_classes": 4},
    "model": {"name": "mlp", "hidden_sizes": [128, 128], "dropout": 0.1},
    "train": {"max_epochs": 2, "batch_size": 16, "checkpoint": {"every_steps": 20}, "early_stopping": {"patience": 50}},
}
STEPS_PER_EPOCH = 219  # 3500 training rows / 16
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def _project(root: Path, tracking_uri: str, experiment: str) -> tuple[Path, dict[str, str]]:
    """A project folder whose CLI runs use the session's Prefect server (no temporary server per process)."""
    from prefect.settings import PREFECT_API_URL

    root.mkdir()
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG | {"tracking": {"uri": tracking_uri, "experiment": experiment}}))
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    return config, env


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "trainflow", "run", str(config), "--out", "out"]


def _run(config: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(_command(config), cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((config.parent / "out" / "summary.json").read_text())


def _train_folder(root: Path) -> Path:
    (folder,) = (root / "artifacts" / "stages" / "train").iterdir()
    return folder


def test_sigkill_mid_epoch_then_rerun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, env = _project(tmp_path / "killed", tracking_uri, "killed")
    process = subprocess.Popen(_command(config), cwd=config.parent, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not list((config.parent / "artifacts").glob("stages/train/*/step-000000040.pt")):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and anything it started
        process.wait()
    folder = _train_folder(config.parent)
    killed_at = load_checkpoint(periodic_checkpoints(folder)[-1])["state"]
    assert killed_at["epoch"] == 0 and 0 < killed_at["batch_in_epoch"] < STEPS_PER_EPOCH, "killed mid-epoch"
    assert not (folder / "model.pt").exists(), "training had not finished"
    run_before = json.loads((folder / "mlflow_run.json").read_text())["run_id"]

    resumed = _run(config, env)
    reference_config, reference_env = _project(tmp_path / "uninterrupted", tracking_uri, "reference")
    reference = _run(reference_config, reference_env)

    train = resumed["stages"]["train"]
    assert train["resumed_from_step"] == killed_at["step"]
    assert train["steps"] == reference["stages"]["train"]["steps"] == 2 * STEPS_PER_EPOCH
    expected = load_checkpoint(_train_folder(reference_config.parent) / "model.pt")["model"]
    actual = load_checkpoint(folder / "model.pt")["model"]
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6)
    assert train["best_val_loss"] == reference["stages"]["train"]["best_val_loss"]

    # The same MLflow runs continue: the pipeline's parent run and the training child run.
    assert train["mlflow_run_id"] == run_before
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_before).data.tags["mlflow.parentRunId"] == resumed["mlflow_run_id"]
    experiment = client.get_experiment_by_name("killed").experiment_id
    pipelines = client.search_runs([experiment], "tags.`trainflow.pipeline` = 'true'")
    assert len(pipelines) == 1 and pipelines[0].info.status == "FINISHED"
    # Metrics still in the writer's interval when the process died are lost; every step after the resume
    # point is in the same run's history.
    logged = {m.step for m in client.get_metric_history(run_before, "train/loss")}
    after_resume = set(range(25, 2 * STEPS_PER_EPOCH + 1, 25)) - set(range(0, killed_at["step"] + 1))
    assert after_resume <= logged
