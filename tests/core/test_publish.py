"""The publish stage on its own: the published folder and its manifest, `verify_manifest` and the
`trainflow verify` command catching damage, and the MLflow model that loads and predicts like the weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import tiny_raw
from tests.core.serving_support import open_run
from trainflow.core.config import Config, config_from_dict
from trainflow.core.data.prepared import load_splits
from trainflow.core.evaluate import evaluate
from trainflow.core.models import build_model
from trainflow.core.prepare_data import prepare_data
from trainflow.core.publish import MANIFEST_FORMAT, publish, verify_manifest
from trainflow.core.records import EvaluateResult, PrepareDataResult, PublishResult, TrainResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.storage.version import code_version
from trainflow.core.tracking.backend import fluent_tracking_uri
from trainflow.core.tracking.runs import Tracker
from trainflow.core.train import train
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.spec import TrainingSpec

REPO = Path(__file__).resolve().parents[2]
FILES = ["model.pt", "config.yaml", "evaluation.json", "preprocessor.pkl"]  # a table ships its preprocessing


@dataclass(frozen=True)
class Published:
    config: Config
    store: LocalStore
    data: PrepareDataResult
    trained: TrainResult
    evaluated: EvaluateResult
    result: PublishResult

    @property
    def folder(self) -> Path:
        return self.store.local_path(self.result.manifest_uri).parent

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.store.local_path(self.result.manifest_uri).read_text())

    def weights(self) -> torch.nn.Module:
        model = build_model(self.config.model, self.data.spec)
        model.load_state_dict(load_checkpoint(self.folder / "model.pt")["model"])
        return model.eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """The tiny wine MLP trained, evaluated and published without MLflow, once for the module."""
    cfg = config_from_dict(tiny_raw(publish={"name": "tiny-wine"}))
    store = LocalStore(tmp_path_factory.mktemp("publish") / "artifacts")
    data = prepare_data(cfg.data, cfg.seed, store)
    spec = TrainingSpec.of(cfg, data)
    trained = train(spec, store, "train")
    evaluated = evaluate(spec, cfg.compress.measure, trained, store, "eval")
    result = publish(cfg, spec, trained, evaluated, store, "published/tiny-wine")
    return Published(cfg, store, data, trained, evaluated, result)


def _copy(published: Published, tmp_path: Path) -> Path:
    """A copy of the published folder to damage; returns its manifest."""
    folder = shutil.copytree(published.folder, tmp_path / "copy")
    return folder / "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------- the published folder
def test_the_folder_holds_the_weights_config_evaluation_and_manifest(published: Published) -> None:
    folder = published.folder
    assert folder == published.store.root / "published" / "tiny-wine"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "manifest.json"])
    assert (folder / "model.pt").read_bytes() == published.store.local_path(
        published.trained.checkpoint_uri
    ).read_bytes()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == published.config.model_dump(mode="json")
    assert config_from_dict(config).sha256() == published.config.sha256(), "the published config resolves to itself"
    assert EvaluateResult.model_validate_json((folder / "evaluation.json").read_text()) == published.evaluated

    result = published.result
    assert [o.uri for o in result.objects] == [(folder / name).as_uri() for name in [*FILES, "manifest.json"]]
    assert result.manifest_uri == result.objects[-1].uri
    for o in result.objects:
        path = published.store.local_path(o.uri)
        assert (o.sha256, o.bytes) == (_sha256(path), path.stat().st_size), path.name
    assert (result.mlflow_model_uri, result.registered_version) == (None, None)


def test_the_manifest_lists_every_file_with_its_sha256_and_size(published: Published) -> None:
    manifest = published.manifest()
    folder = published.folder
    assert manifest["files"] == [
        {"path": name, "sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in FILES
    ]
    assert manifest["format"] == MANIFEST_FORMAT and manifest["name"] == "tiny-wine"
    assert manifest["config_sha256"] == published.config.sha256()
    assert manifest["data_fingerprint"] == published.data.fingerprint
    assert manifest["code_version"] == code_version()
    assert manifest["metrics"] == published.evaluated.metrics
    nothing_tracked = ("mlflow_run_id", "mlflow_train_run_id", "mlflow_model_uri", "registered_model")
    assert {key: manifest[key] for key in nothing_tracked} == dict.fromkeys(nothing_tracked)


# ------------------------------------------------------------------------------- verification
def _flip_a_byte(path: Path) -> str:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    return f"{path.name}: sha256 differs from the manifest"


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    return f"{path.name}: {size - 10} bytes, manifest says {size}"


def _delete(path: Path) -> str:
    path.unlink()
    return f"{path.name}: missing"


@pytest.mark.parametrize(
    ("name", "damage"),
    [("model.pt", _flip_a_byte), ("config.yaml", _truncate), ("evaluation.json", _delete)],
    ids=["one byte changed, same size", "truncated", "deleted"],
)
def test_verify_manifest_catches_damage(
    published: Published, tmp_path: Path, name: str, damage: Callable[[Path], str]
) -> None:
    manifest = _copy(published, tmp_path)
    store = LocalStore(manifest.parent)
    assert verify_manifest(manifest.as_uri(), store) == []
    size = (manifest.parent / name).stat().st_size
    problem = damage(manifest.parent / name)
    if damage is _flip_a_byte:
        assert (manifest.parent / name).stat().st_size == size
    assert verify_manifest(manifest.as_uri(), store) == [problem]
    assert verify_manifest(published.result.manifest_uri, published.store) == [], "the original is untouched"


def test_verify_manifest_lists_every_problem_in_manifest_order(published: Published, tmp_path: Path) -> None:
    manifest = _copy(published, tmp_path)
    problems = [_delete(manifest.parent / "model.pt"), _flip_a_byte(manifest.parent / "evaluation.json")]
    assert verify_manifest(manifest.as_uri(), LocalStore(manifest.parent)) == problems


def _trainflow_verify(manifest: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "trainflow", "verify", str(manifest)],
        cwd=manifest.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_the_verify_command_exits_0_when_intact_and_1_naming_the_damage(published: Published, tmp_path: Path) -> None:
    manifest = _copy(published, tmp_path)
    intact = _trainflow_verify(manifest)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout == f"{manifest}: every file matches its sha256 and size\n"

    problem = _flip_a_byte(manifest.parent / "model.pt")
    damaged = _trainflow_verify(manifest)
    assert damaged.returncode == 1, damaged.stderr
    assert f"{manifest}: {problem}" in damaged.stderr.splitlines()
    assert "Traceback" not in damaged.stderr
    assert damaged.stdout == ""


# ------------------------------------------------------------------------------- MLflow model
@pytest.mark.slow
def test_the_mlflow_model_loads_and_predicts_like_the_published_weights(
    published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.for_experiment(uri, "publish-tests")
    run = open_run(tracker, "publish")
    run_id = run.run_id
    cfg = config_from_dict(tiny_raw(publish={"name": "tiny-wine", "registered_model_name": "tiny-wine"}))
    spec = TrainingSpec.of(cfg, published.data)
    result = publish(cfg, spec, published.trained, published.evaluated, published.store, "mlflow", run)
    assert result.mlflow_model_uri is not None and result.registered_version == 1
    manifest = json.loads(published.store.local_path(result.manifest_uri).read_text())
    assert manifest["mlflow_run_id"] == run_id and manifest["mlflow_model_uri"] == result.mlflow_model_uri
    assert manifest["registered_model"] == {
        "name": "tiny-wine",
        "version": 1,
        "aliases": ["candidate", "champion"],  # the first version: no champion before it
        "champion_metric": "accuracy",
        "champion_decision": "promoted",
        "champion_reason": result.champion_reason,
        "challenger_score": result.challenger_score,
        "champion_score": None,
        "champion_version": None,
    }

    import mlflow.pyfunc

    with fluent_tracking_uri(uri):
        logged = mlflow.pyfunc.load_model(result.mlflow_model_uri)
        registered = mlflow.pyfunc.load_model("models:/tiny-wine/1")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    data = published.data
    raw = pd.read_pickle(published.store.local_path(data.preprocessor_uri))["examples"]  # raw test rows
    x = torch.from_numpy(load_splits(published.store, data).x["test"][:5])
    with torch.no_grad():
        expected = torch.softmax(published.weights()(x).double(), -1).numpy()
    for model in (logged, registered):  # raw rows in: the preprocessing travels inside the model
        out = model.predict(raw)
        assert out["label"].tolist() == [data.spec.class_names[i] for i in expected.argmax(1)]
        np.testing.assert_allclose(out.filter(like="proba_").to_numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "problem"),
    [("{not json", "JSONDecodeError"), ('{"files": []}', "ValueError: format None"), ("[1, 2]", "TypeError")],
    ids=["not-json", "no-format", "not-a-mapping"],
)
def test_verify_on_a_file_that_is_no_manifest_is_one_line_and_exit_2(
    tmp_path: Path, content: str, problem: str
) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "trainflow", "verify", str(manifest)],
        env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: {manifest}: not a readable trainflow manifest ({problem}")
