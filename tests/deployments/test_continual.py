"""Continual training: a served config that starts from `models:/<name>@champion` re-trains from the champion's
version when its dataset event fires, the champion's served model is scored on the new test split in the same run,
and the champion alias moves only by the margin rule; a moved alias re-runs training instead of coming back
`Cached`. Prefect's test server, a real `trainflow serve` process, MLflow on SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from sklearn.datasets import load_wine

from tests.conftest import REPO, tiny_raw
from tests.deployments.test_serve import _runs, _state, _wait
from trainflow.flows.pipeline import training_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
NAME = "wine-continual"


def _config(root: Path, name: str, csv: Path, **model: Any) -> Path:
    raw = tiny_raw(compress={"enabled": False}, publish={"name": NAME, "registered_model_name": NAME}) | {
        "data": {"source": "csv", "path": str(csv), "target": "target"},
        "model": {"name": "mlp", "hidden_sizes": [32], "dropout": 0.0, **model},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "continual"},
        "store": {"uri": str(root / "artifacts")},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_new_data_retrains_from_the_champion_and_the_margin_rule_decides(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    wine = load_wine(as_frame=True).frame
    csv = tmp_path / "wine.csv"
    wine.sample(frac=0.5, random_state=0).to_csv(csv, index=False)  # part of the dataset
    champion = training_pipeline(str(_config(tmp_path, "champion", csv)), [], str(tmp_path / "out-champion"))
    assert champion["stages"]["publish"]["aliases"] == ["candidate", "champion"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    continual = _config(tmp_path, "continual", csv, init_from=f"models:/{NAME}@champion")
    wine.to_csv(csv, index=False)  # the data grows
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "trainflow", "serve", str(continual), "--out", str(tmp_path / "out")]
    serve = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        _wait("the served deployment", lambda: serve.poll() is not None or _deployment_exists(), timeout=90)
        emitted = subprocess.run([sys.executable, "-m", "trainflow", "emit-dataset-updated", str(csv)], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert emitted.returncode == 0, emitted.stderr
        run = _wait("a run started by the event", lambda: _runs("continual"), timeout=60)[0]
        _wait("the run to end", lambda: _state(run.id) in ("Completed", "Failed", "Crashed"), timeout=300)
        assert _state(run.id) == "Completed", (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        log.close()

    summary = json.loads((tmp_path / "out" / "continual" / "summary.json").read_text())
    parent = summary["stages"]["train"]["parent"]
    assert (parent["registered_model"], parent["version"]) == (NAME, 1)  # the version, never the alias
    assert parent["data_fingerprint"] == champion["stages"]["prepare_data"]["fingerprint"]
    assert summary["stages"]["prepare_data"]["fingerprint"] != parent["data_fingerprint"]  # new data
    published = summary["stages"]["publish"]
    tags = client.get_model_version(NAME, "2").tags
    assert tags["trainflow.parent.version"] == "1" and tags["trainflow.parent.registered_model"] == NAME
    new, old = float(tags["trainflow.challenger_score"]), float(tags["trainflow.champion_score"])
    decision = "promoted" if new - old > 0.005 else "kept"  # publish.promote_margin's default for accuracy
    assert published["champion_decision"] == tags["trainflow.champion_decision"] == decision
    assert "both on v2's test split" in published["champion_reason"]
    manifest = json.loads(Path(published["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["parent"]["version"] == 1 and manifest["registered_model"]["champion_score"] == old
    # the champion's fitted scaling carried over (its weights learned it), not refitted on the grown data
    scalers = [pd.read_pickle(Path(s["stages"]["prepare_data"]["preprocessor_uri"].removeprefix("file://")))
               for s in (champion, summary)]  # fmt: skip
    features = wine.drop(columns="target").head(4)
    np.testing.assert_array_equal(*(s["transformer"].transform(features) for s in scalers))

    # the champion moves (by the rule, or by hand): the same config re-trains from the new holder, not `Cached`
    client.set_registered_model_alias(NAME, "champion", "2")
    again = training_pipeline(str(continual), [], str(tmp_path / "out-again"))
    assert again["stages"]["train"]["cached"] is False
    assert again["stages"]["train"]["parent"]["version"] == 2


def _deployment_exists() -> Any:
    from prefect.exceptions import ObjectNotFound

    from tests.deployments.test_serve import _client

    try:
        with _client() as client:
            return client.read_deployment_by_name("training_pipeline/continual")
    except ObjectNotFound:
        return None
