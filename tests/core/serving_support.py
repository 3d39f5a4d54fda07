"""Helpers of the serving tests: prepared data with a seeded untrained model (`Case`), exported
and logged to a throwaway MLflow database (`Tracking`), and the in-process answers to compare with."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from tests.conftest import tiny_raw
from trainflow.core.compression.quantization import save_torch_program
from trainflow.core.config import config_from_dict
from trainflow.core.data.prepared import load_splits
from trainflow.core.models import build_model
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.serving.mlflow_model import ServingModelInfo, log_serving_model
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.backend import fluent_tracking_uri
from trainflow.core.tracking.runs import RunLogger, Tracker

SEQ_LEN = 16
PROMPTS = ["The ", "x", "def function(argument):\n    return"]  # short, one byte, longer than seq_len
GPT = {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16}


@dataclass
class Case:
    """Prepared data and a seeded, untrained model (the comparisons need no training)."""

    data: PrepareDataResult
    store: LocalStore
    model: torch.nn.Module
    folder: Path

    @property
    def pre(self) -> dict[str, Any]:
        return pd.read_pickle(self.store.local_path(self.data.preprocessor_uri))

    def x_test(self) -> np.ndarray:
        return load_splits(self.store, self.data).x["test"]

    def proba(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.model(torch.from_numpy(x)).double(), -1).numpy()

    def export(self, suffix: str) -> Path:
        path = self.folder / f"model{suffix}"
        text = self.data.spec.task == "language_modeling"
        x = torch.zeros(2, SEQ_LEN, dtype=torch.int64) if text else torch.zeros(2, *self.data.spec.input_shape)
        if suffix == ".pt2":
            return save_torch_program(self.model, x, path)
        with warnings.catch_warnings():  # tracer warnings of the legacy exporters
            warnings.simplefilter("ignore")
            if suffix == ".ts":
                torch.jit.trace(self.model, (x,)).save(str(path))
            else:  # the GPT's length stays fixed at seq_len: served prompts are padded
                axes = {"x": {0: "batch"}}
                torch.onnx.export(self.model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes=axes)
        return path


@dataclass
class Tracking:
    uri: str
    run: RunLogger

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def log(self, case: Case, model_file: Path, name: str) -> str:
        return self.log_info(case, model_file, name).model_uri

    def log_info(self, case: Case, model_file: Path, name: str) -> ServingModelInfo:
        info = log_serving_model(model_file, case.data, case.store, name=name, run=self.run)
        assert (info.onnx_model_uri is not None) == (model_file.suffix == ".onnx")
        return info

    def load(self, model_uri: str) -> mlflow.pyfunc.PyFuncModel:
        with fluent_tracking_uri(self.uri):
            return mlflow.pyfunc.load_model(model_uri)

    def download(self, model_uri: str, folder: Path) -> Path:
        with fluent_tracking_uri(self.uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder)))


def open_tracking(folder: Path) -> Tracking:
    """A stage run in a new SQLite tracking database under `folder`, to log the served models into."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker.for_experiment(uri, "serving-tests")
    return Tracking(uri, open_run(tracker, "publish"))


def open_run(tracker: Tracker, name: str) -> RunLogger:
    """A run to log into, as a stage's (it stays open: the test ends it, or not)."""
    run_id = tracker.client.create_run(tracker.experiment_id, run_name=name).info.run_id
    return RunLogger(tracker.client, run_id, tracker.experiment_id)


def people(n: int = 90) -> pd.DataFrame:
    """Float and int columns, a string category and a bool, with NaNs in the float and the category."""
    rng = np.random.default_rng(3)
    height = rng.normal(170.0, 10.0, n)
    height[[3, 17, 40]] = np.nan
    colour = rng.choice(["red", "green", "blue"], n).astype(object)
    colour[[5, 22]] = None
    label = np.array(["yes", "no", "maybe"])[np.arange(n) % 3]
    age = rng.integers(18, 80, n)
    return pd.DataFrame({"height": height, "age": age, "colour": colour, "smoker": rng.random(n) < 0.3, "label": label})


def make_case(folder: Path, name: str, data: dict[str, Any], model: dict[str, Any]) -> Case:
    """`data` prepared under `folder`, and the model `model` built for it with torch seed 0."""
    raw = tiny_raw()
    raw["data"], raw["model"] = data, model
    cfg = config_from_dict(raw)
    store = LocalStore(folder / "artifacts")
    prepared = prepare_data(cfg.data, cfg.seed, store)
    torch.manual_seed(0)
    (folder / name).mkdir()
    return Case(prepared, store, build_model(cfg.model, prepared.spec).eval(), folder / name)


def people_case(folder: Path) -> Case:
    """`people()` as a CSV source, and an MLP."""
    path = folder / "people.csv"
    people().to_csv(path, index=False)
    return make_case(folder, "people", {"source": "csv", "path": str(path), "target": "label"}, {"name": "mlp"})


def text_case(folder: Path) -> Case:
    """The default text corpus in windows of SEQ_LEN bytes, and a one-block GPT."""
    return make_case(folder, "text", {"source": "text", "seq_len": SEQ_LEN}, GPT)


def image_case(folder: Path) -> Case:
    """Tinted RGB digits (3 classes) in an image folder at 12 px, and a small CNN."""
    from tests.core.folder_support import write_digits

    root = write_digits(folder / "digit-images", per_class=9, size=20, rgb=True)
    data = {"source": "image_folder", "path": str(root), "image_size": 12, "color": "rgb"}
    return make_case(folder, "images", data, {"name": "cnn", "channels": [4, 8]})


def assert_classes(served: pd.DataFrame, proba: np.ndarray, class_names: list[str]) -> None:
    assert list(served.columns) == ["label", *(f"proba_{c}" for c in class_names)]
    np.testing.assert_allclose(served.iloc[:, 1:].to_numpy(), proba, rtol=0, atol=1e-5)
    assert served["label"].tolist() == [class_names[i] for i in proba.argmax(1)]


def greedy(model: torch.nn.Module, prompt: str, n: int) -> tuple[str, list[int], np.ndarray]:
    """Continuation, top-5 next bytes and the full next-byte distribution, from the model in-process."""
    ids = list(prompt.encode())
    with torch.no_grad():
        proba = torch.softmax(model(torch.tensor([ids[-SEQ_LEN:]]))[0, -1].double(), -1).numpy()
        out: list[int] = []
        for _ in range(n):
            out.append(int(model(torch.tensor([(ids + out)[-SEQ_LEN:]]))[0, -1].argmax()))
    return bytes(out).decode("utf-8", errors="replace"), np.argsort(-proba, kind="stable")[:5].tolist(), proba
