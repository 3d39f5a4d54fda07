"""The served MLflow model takes raw inputs (table rows, pixel arrays, strings) and answers like our
preprocessing plus the torch model in-process; its folder carries only the serving module and minimal,
pinned requirements. (The fresh-venv check is in test_serving_venv.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

import trainflow.core.serving
from tests.core.serving_support import (
    PROMPTS,
    Case,
    Tracking,
    assert_classes,
    greedy,
    make_case,
    open_tracking,
    people_case,
    text_case,
)
from trainflow.core.data.preprocess import categories_as_strings

pytestmark = pytest.mark.slow  # MLflow models logged and loaded: left out of `pytest -m 'not slow'`


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def tracking(folder: Path) -> Tracking:
    return open_tracking(folder)


@pytest.fixture(scope="module")
def wine(folder: Path) -> Case:
    return make_case(folder, "wine", {"source": "sklearn", "name": "wine"}, {"name": "mlp", "hidden_sizes": [16]})


@pytest.fixture(scope="module")
def csv_people(folder: Path) -> Case:
    return people_case(folder)


@pytest.fixture(scope="module")
def digits(folder: Path) -> Case:
    return make_case(folder, "digits", {"source": "sklearn", "name": "digits"}, {"name": "cnn", "channels": [4]})


@pytest.fixture(scope="module")
def text(folder: Path) -> Case:
    return text_case(folder)


# ------------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize("suffix", [".pt2", ".ts"], ids=["torch-program", "torchscript"])
def test_raw_table_rows_predict_like_our_preprocessing_and_the_model(
    wine: Case, tracking: Tracking, suffix: str
) -> None:
    served = tracking.load(tracking.log(wine, wine.export(suffix), f"wine{suffix.replace('.', '-')}"))
    raw, expected = wine.pre["examples"], wine.proba(wine.x_test()[:5])
    assert raw.shape == (5, 13)
    assert_classes(served.predict(raw), expected, wine.data.spec.class_names)
    shuffled = raw[raw.columns[::-1]].assign(comment="extra columns are ignored")
    pd.testing.assert_frame_equal(served.predict(shuffled), served.predict(raw))
    pd.testing.assert_frame_equal(served.predict(raw.iloc[[3]]), served.predict(raw).iloc[[3]].reset_index(drop=True))

    with pytest.raises(MlflowException, match=r"missing inputs \['hue'\]"):  # MLflow's schema check
        served.predict(raw.drop(columns="hue"))
    with pytest.raises(ValueError, match=r"missing input column.*: hue"):  # ours, behind it
        served.unwrap_python_model().predict(None, raw.drop(columns="hue"))


def test_missing_values_and_unseen_categories_are_handled_as_in_training(csv_people: Case, tracking: Tracking) -> None:
    info = tracking.log_info(csv_people, csv_people.export(".onnx"), "people")
    served = tracking.load(info.model_uri)
    inputs = served.metadata.get_input_schema().to_dict()
    assert {c["name"]: c["type"] for c in inputs} == {
        "height": "double",
        "age": "any",
        "colour": "string",
        "smoker": "any",
    }
    rows = pd.DataFrame(
        {
            "height": [np.nan, 180.0, 165.0, np.nan],
            "age": [30, np.nan, 50, 41],
            "colour": [None, "purple", "red", np.nan],  # purple: never seen in training
            "smoker": [True, None, False, False],
        }
    )
    pre = csv_people.pre
    x = pre["transformer"].transform(categories_as_strings(rows, pre["categorical"])).astype(np.float32)
    assert_classes(served.predict(rows), csv_people.proba(x), csv_people.data.spec.class_names)
    assert x[1, 2:5].tolist() == [0.0, 0.0, 0.0], "an unseen colour encodes as no colour"
    assert_classes(served.predict(pre["examples"]), csv_people.proba(csv_people.x_test()[:5]), ["maybe", "no", "yes"])
    with pytest.raises(ValueError, match="column 'age' must be numeric"):
        served.predict(rows.assign(age=["old", 1, 2, 3]))

    assert info.onnx_model_uri is not None  # the same file in the onnx flavor: preprocessed inputs
    (logits,) = tracking.load(info.onnx_model_uri).predict(csv_people.x_test()[:5]).values()
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(logits), -1), csv_people.proba(csv_people.x_test()[:5]), atol=1e-5
    )


# ------------------------------------------------------------------------------------------ images
def test_images_take_pixel_arrays_flat_arrays_and_pixel_dataframes(digits: Case, tracking: Tracking) -> None:
    served = tracking.load(tracking.log(digits, digits.export(".pt2"), "digits"))
    assert served.metadata.get_input_schema() is None, "three input forms: no single MLflow schema"
    frame = digits.pre["examples"]
    images = frame.to_numpy().reshape(-1, 8, 8)
    expected = digits.proba(digits.x_test()[:5])
    names = digits.data.spec.class_names
    assert_classes(served.predict(images), expected, names)
    assert_classes(served.predict(images.reshape(5, 64).astype(np.uint8)), expected, names)
    assert_classes(served.predict(frame[frame.columns[::-1]]), expected, names)
    assert_classes(served.predict(images[2]), expected[[2]], names)
    with pytest.raises(ValueError, match=r"missing input column.*: pixel_0_0"):
        served.predict(frame.drop(columns="pixel_0_0"))
    with pytest.raises(ValueError, match=r"expected 64 values per row, got an array of shape \(5, 7, 7\)"):
        served.predict(images[:, :7, :7])


# -------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"], ids=["torch-program-dynamic-length", "onnx-fixed-length"])
def test_text_gives_the_models_greedy_continuation_and_top_bytes(text: Case, tracking: Tracking, suffix: str) -> None:
    served = tracking.load(tracking.log(text, text.export(suffix), f"gpt{suffix.replace('.', '-')}"))
    out = served.predict(PROMPTS, params={"max_new_bytes": 6})
    assert list(out.columns[:4]) == ["continuation", "top1_byte", "top1_char", "top1_proba"]
    for row, prompt in zip(out.itertuples(), PROMPTS, strict=True):
        continuation, top, proba = greedy(text.model, prompt, 6)
        assert row.continuation == continuation
        assert [getattr(row, f"top{k}_byte") for k in range(1, 6)] == top
        np.testing.assert_allclose([getattr(row, f"top{k}_proba") for k in range(1, 6)], proba[top], atol=1e-5)
    pd.testing.assert_frame_equal(served.predict(pd.DataFrame({"text": PROMPTS}), params={"max_new_bytes": 6}), out)
    (default,) = served.predict("The ")["continuation"]  # one string, max_new_bytes at its default 32
    assert default == greedy(text.model, "The ", 32)[0]


def test_text_sampling_is_seeded_and_bad_input_is_a_value_error(text: Case, tracking: Tracking) -> None:
    served = tracking.load(tracking.log(text, text.export(".pt2"), "gpt-sampling"))
    params = {"max_new_bytes": 12, "temperature": 1.0, "seed": 7}
    first = served.predict(["The "], params=params)
    pd.testing.assert_frame_equal(served.predict(["The "], params=params), first)
    others = {served.predict(["The "], params={**params, "seed": s}).iloc[0]["continuation"] for s in range(8)}
    assert len(others) > 1, "another seed, another sample"
    assert served.metadata.get_params_schema().to_dict() == [
        {"name": "max_new_bytes", "type": "long", "default": 32, "shape": None},
        {"name": "temperature", "type": "double", "default": 0.0, "shape": None},
        {"name": "seed", "type": "long", "default": 0, "shape": None},
    ]
    with pytest.raises(ValueError, match="empty text"):
        served.predict([""])


# ------------------------------------------------------------------------------- the model folder
def test_the_model_folder_carries_only_the_serving_module_and_minimal_requirements(
    csv_people: Case, text: Case, tracking: Tracking, tmp_path: Path
) -> None:
    table = tracking.download(tracking.log(csv_people, csv_people.export(".onnx"), "people-folder"), tmp_path / "t")
    gpt = tracking.download(tracking.log(text, text.export(".pt2"), "gpt-folder"), tmp_path / "g")
    for model in (table, gpt):
        assert sorted(p.name for p in (model / "code").iterdir()) == ["trainflow_images.py", "trainflow_serving.py"]
        pickled = (model / "python_model.pkl").read_bytes()
        assert b"trainflow_serving" in pickled and b"core" not in pickled, "RawInputModel pickled by reference"
    names = [line.split("==")[0] for line in (table / "requirements.txt").read_text().split()]
    assert names == ["onnxruntime", "numpy", "pandas", "scikit-learn", "mlflow-skinny"]
    names = [line.split("==")[0] for line in (gpt / "requirements.txt").read_text().split()]
    assert names == ["torch", "numpy", "pandas", "mlflow-skinny"]
    assert sorted(p.name for p in (table / "artifacts").iterdir()) == ["meta.json", "model.onnx", "preprocessor.pkl"]


def _imports(name: str) -> set[str]:
    source = Path(trainflow.core.serving.__file__).with_name(name).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
    return imported


def test_the_serving_module_imports_nothing_of_trainflow() -> None:
    """Checked statically here; test_serving_venv.py proves it where trainflow is not installed."""
    assert _imports("trainflow_serving.py") == {"__future__", "json", "pickle", "collections", "pathlib", "typing",
                                                "mlflow", "numpy", "pandas", "onnxruntime", "torch",
                                                "trainflow_images"}  # fmt: skip
    assert _imports("trainflow_images.py") == {"__future__", "io", "typing", "numpy", "PIL"}
