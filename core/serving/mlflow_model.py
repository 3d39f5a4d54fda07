"""Log a model users can serve: an MLflow pyfunc (`RawInputModel`, core/serving/trainflow_serving.py) that
takes raw inputs, carries the fitted preprocessing, and needs neither trainflow nor its source; plus, for an
ONNX file, the same file in MLflow's onnx flavor (preprocessed inputs) under a second name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from trainflow.core.data.prepared import load_splits
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.tracking.runs import RunLogger

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature


log = logging.getLogger(__name__)

SERVING_FILE = Path(__file__).resolve().with_name("trainflow_serving.py")
IMAGES_FILE = SERVING_FILE.with_name("trainflow_images.py")  # the image resizing rule, shipped beside it
RUNTIMES = {".onnx": "onnxruntime", ".pt2": "torch", ".ts": "torch"}
N_TEXT_EXAMPLES = 2


@dataclass(frozen=True)
class ServingModelInfo:
    model_uri: str  # the raw-input pyfunc, models:/m-...
    registered_version: int | None
    onnx_model_uri: str | None  # the onnx flavor of an .onnx file (preprocessed inputs)


def serving_module() -> ModuleType:
    """trainflow_serving imported under its top-level name, as a served model imports it, so that
    cloudpickle records `trainflow_serving.RawInputModel` rather than a `core.` path."""
    for name, file in (("trainflow_images", IMAGES_FILE), ("trainflow_serving", SERVING_FILE)):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    return sys.modules["trainflow_serving"]


def log_serving_model(
    model_file: Path,
    data: PrepareDataResult,
    store: ArtifactStore,
    *,
    name: str,
    run: RunLogger,
    registered_model_name: str | None = None,
    onnx_name: str | None = None,
    intra_op_threads: int = 0,
) -> ServingModelInfo:
    """Log `model_file` (.onnx, .pt2 or .ts) as a raw-input pyfunc named `name` into `run`, with
    signature, raw input example and pinned pip requirements; an .onnx file also in the onnx flavor as
    `onnx_name` (default `<name>-onnx`). Registers the pyfunc as `registered_model_name` when given."""
    import mlflow

    runtime = RUNTIMES.get(model_file.suffix)
    if runtime is None:
        raise ValueError(f"{model_file.name}: a served model is .onnx, .pt2 or .ts")
    preprocessor = _read_preprocessor(data, store)
    with tempfile.TemporaryDirectory() as tmp:
        meta = serving_meta(model_file, data, preprocessor, intra_op_threads)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        artifacts = {"meta": str(meta_path), "model": str(model_file)}
        if data.preprocessor_uri:
            artifacts["preprocessor"] = str(store.local_path(data.preprocessor_uri))
        example = raw_example(data, store, preprocessor)
        loaded = serving_module().RawInputModel()  # the prediction the signature describes
        loaded.load_context(mlflow.pyfunc.PythonModelContext(artifacts=artifacts, model_config={}))
        signature = serving_signature(meta["input_kind"], example, loaded.predict(None, example))
        with run.fluent(), _quiet_model_logging():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=serving_module().RawInputModel(),  # stateless: pickled by reference
                artifacts=artifacts,
                code_paths=[str(SERVING_FILE), str(IMAGES_FILE)],
                signature=signature,
                input_example=example,
                pip_requirements=serving_requirements(runtime, preprocessor is not None, meta["input_kind"]),
                registered_model_name=registered_model_name,
            )
            onnx_uri = None
            if runtime == "onnxruntime":
                onnx_uri = _log_onnx(model_file, data, store, onnx_name or f"{name}-onnx")
    version = info.registered_model_version
    log.info("served model %s (%s input) logged as %s", model_file.name, meta["input_kind"], info.model_uri)
    return ServingModelInfo(info.model_uri, int(version) if version is not None else None, onnx_uri)


def serving_meta(
    model_file: Path, data: PrepareDataResult, preprocessor: dict[str, Any] | None, intra_op_threads: int = 0
) -> dict[str, Any]:
    """The `meta` artifact `RawInputModel` reads: what the model takes and gives."""
    spec = data.spec
    if spec.task == "language_modeling":
        kind = "text"
    else:
        kind = "image" if preprocessor and preprocessor.get("image_shape") else "table"
        if preprocessor and preprocessor.get("kind") == "image_file":
            kind = "image_file"
    return {
        "format": serving_module().SERVING_FORMAT,
        "task": spec.task,
        "runtime": RUNTIMES[model_file.suffix],
        "model_file": model_file.name,
        "input_kind": kind,
        "input_shape": list(spec.input_shape),
        "seq_len": spec.seq_len,
        # text prompts are right-padded to the block size: exact for a causal model, and the only length a
        # fixed-shape export (the compress stage's) takes
        "fixed_length": spec.seq_len if kind == "text" else None,
        "columns": preprocessor["columns"] if preprocessor else None,
        "class_names": spec.class_names,
        "top_k": 5,
        "intra_op_threads": intra_op_threads,
    }


def raw_example(
    data: PrepareDataResult, store: ArtifactStore, preprocessor: dict[str, Any] | None = None
) -> pd.DataFrame | np.ndarray | list[str]:
    """A few raw test inputs as a user would send them: table rows (DataFrame), images (N, H, W) or
    (N, C, H, W), or text snippets. Tables and images keep theirs in the preprocessor pickle."""
    if data.spec.task == "language_modeling":
        tokens = load_splits(store, data).x["test"]
        size = min(data.spec.input_shape[0], len(tokens) // N_TEXT_EXAMPLES)
        chunks = [tokens[i * size : (i + 1) * size].tobytes() for i in range(N_TEXT_EXAMPLES)]
        return [chunk.decode("utf-8", errors="ignore") or " " for chunk in chunks]
    preprocessor = preprocessor or _read_preprocessor(data, store)
    if preprocessor is None:
        raise ValueError(f"{data.uri}: prepared without a preprocessor (prepare it again to serve raw inputs)")
    examples = preprocessor["examples"]
    if preprocessor.get("kind") == "image_file":  # uint8 (N, H, W, C) at the training size
        return examples
    shape = preprocessor.get("image_shape")
    if shape:  # pixels as an array; a single channel drops its axis: (N, H, W)
        return examples.to_numpy().reshape(-1, *(shape[1:] if shape[0] == 1 else shape))
    return examples


def serving_signature(kind: str, example: Any, prediction: pd.DataFrame) -> ModelSignature:
    """`infer_signature(example, prediction)`, made to let raw inputs through MLflow's schema check:

    - table: an integer or boolean column also accepts a missing value, and a float32 one float64 (any type);
    - image: no input schema, since (N, H, W) arrays, flat (N, H*W) arrays and pixel DataFrames are all
      accepted and MLflow's check allows exactly one form (the input example shows the array form);
    - text: one unnamed string column (a list of strings, a string, or a DataFrame with column `text`),
      and the generation params (max_new_bytes, temperature, seed) with their defaults.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    with warnings.catch_warnings():  # "integer columns cannot represent missing values": relaxed below
        warnings.filterwarnings("ignore", message=".*[Ii]nteger column")
        params = dict(serving_module().TEXT_PARAMS) if kind == "text" else None
        inferred = infer_signature(example, prediction, params=params)
    if kind == "text":
        return inferred
    if kind in ("image", "image_file"):
        return ModelSignature(inputs=None, outputs=inferred.outputs)
    strict = (DataType.long, DataType.integer, DataType.boolean, DataType.float)
    columns = [
        ColSpec(AnyType(), spec.name, required=spec.required) if spec.type in strict else spec
        for spec in inferred.inputs.inputs
    ]
    return ModelSignature(inputs=Schema(columns), outputs=inferred.outputs)


def serving_requirements(runtime: str, with_preprocessor: bool, kind: str = "table") -> list[str]:
    """Pinned, minimal: the runtime, numpy, pandas, scikit-learn (only to unpickle a preprocessor), Pillow (to
    decode and resize an image model's inputs) and mlflow-skinny (MLflow would otherwise add the full `mlflow`;
    skinny loads and serves a pyfunc)."""
    sklearn = with_preprocessor and kind != "image_file"  # an image model's preprocessor is numpy only
    names = [runtime, "numpy", "pandas", *(["scikit-learn"] if sklearn else []),
             *(["pillow"] if kind == "image_file" else []), "mlflow-skinny"]  # fmt: skip
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in names]


@contextmanager
def _quiet_model_logging() -> Iterator[None]:
    """Without what MLflow prints while it logs the pyfunc that no user can act on: a progress bar per artifact
    it copies to check the input example, and the warning that a `python_model` object is pickled (ours is
    stateless and pickled by reference to trainflow_serving, shipped as code beside it)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as progress_bar

    def not_the_pickle_warning(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Passing a Python object as `python_model`")

    saved = progress_bar.get_raw()
    progress_bar.set("false")
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    pyfunc_log.addFilter(not_the_pickle_warning)
    try:
        yield
    finally:
        pyfunc_log.removeFilter(not_the_pickle_warning)
        progress_bar.unset() if saved is None else progress_bar.set(saved)


def _read_preprocessor(data: PrepareDataResult, store: ArtifactStore) -> dict[str, Any] | None:
    if not data.preprocessor_uri:
        return None
    with open(store.local_path(data.preprocessor_uri), "rb") as f:
        return pickle.load(f)  # written by our prepare_data


def log_onnx_model(
    model_file: Path, data: PrepareDataResult, store: ArtifactStore, *, name: str, run: RunLogger
) -> str:
    """An .onnx variant in MLflow's onnx flavor (preprocessed inputs) into `run`; its model URI."""
    with run.fluent():
        return _log_onnx(model_file, data, store, name)


def _log_onnx(model_file: Path, data: PrepareDataResult, store: ArtifactStore, name: str) -> str:
    """The .onnx file in MLflow's onnx flavor: preprocessed inputs in, a dict of outputs out."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    runner = serving_module().ModelRunner(model_file)
    x = load_splits(store, data).x["test"]
    if data.spec.task == "language_modeling":
        length = runner.fixed_length or data.spec.input_shape[0]
        x = x[: N_TEXT_EXAMPLES * length].astype(np.int64).reshape(N_TEXT_EXAMPLES, length)
    else:
        x = x[:5]
    info = mlflow.onnx.log_model(
        onnx.load(str(model_file)),
        name=name,
        signature=infer_signature(x, runner(x)),
        input_example=x,
        # ONNX Runtime serves the compressed variants on the CPU (a GPU serves the PyTorch ones); MLflow's default,
        # CUDA first, warns whenever the model is loaded without it, as when the input example is checked here
        onnx_execution_providers=["CPUExecutionProvider"],
        pip_requirements=[f"{n}=={installed_version(n)}" for n in ("onnx", "onnxruntime", "numpy", "mlflow-skinny")],
    )
    return info.model_uri
