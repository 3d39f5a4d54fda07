"""`timeouts.<stage>`: a stage that runs past its limit ends the run with a one-line error naming the limit;
a timed-out training leaves a checkpoint, and the re-run with a higher limit resumes from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw
from trainflow.core.errors import StageTimeoutError
from trainflow.core.training.checkpoint import load_checkpoint, periodic_checkpoints
from trainflow.flows.pipeline import training_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_a_stuck_training_is_ended_by_its_timeout_and_resumes_after(tmp_path: Path) -> None:
    raw = tiny_raw(
        train={"max_epochs": 16, "early_stopping": {"enabled": False}, "checkpoint": {"every_steps": 100000}},
        compress={"enabled": False},
        timeouts={"train": 4},
    ) | {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "timeouts"},
         "store": {"uri": str(tmp_path / "artifacts")}}  # fmt: skip
    raw["model"] = {"name": "factory", "factory": "tests.core.factories:paced_net", "params": {"seconds": 0.05}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))  # 16 epochs x 8 steps x >= 50 ms: >= 6.4 s of training

    with pytest.raises(StageTimeoutError) as raised:
        training_pipeline(str(config), [], str(tmp_path / "out"))
    assert str(raised.value).startswith("train: stopped after 4 s, the limit timeouts.train sets")
    [folder] = list((tmp_path / "artifacts" / "stages" / "train").iterdir())
    [checkpoint] = periodic_checkpoints(folder)
    step = load_checkpoint(checkpoint)["state"]["step"]
    assert 0 < step < 128

    summary = training_pipeline(str(config), ["timeouts.train=null"], str(tmp_path / "out"))
    assert summary["stages"]["train"]["resumed_from_step"] == step
    assert summary["stages"]["train"]["steps"] == 128
