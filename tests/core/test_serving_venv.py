"""The served model loads and predicts raw inputs in a fresh virtual environment made from nothing but
its own requirements.txt (ONNX models: no torch, no trainflow, no source), and through `mlflow models
predict` there. One venv per test session; about 40 s to install from the local wheel folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.core.serving_support import (
    PROMPTS,
    Case,
    Tracking,
    assert_classes,
    greedy,
    image_case,
    open_tracking,
    people,
    people_case,
    text_case,
)
from trainflow.core.data.preprocess import categories_as_strings
from trainflow.core.serving.trainflow_images import normalized, square_image

pytestmark = pytest.mark.slow  # a fresh virtual environment installed: left out of `pytest -m 'not slow'`

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving-venv")


@pytest.fixture(scope="module")
def tracking(folder: Path) -> Tracking:
    return open_tracking(folder)


@pytest.fixture(scope="module")
def csv_people(folder: Path) -> Case:
    return people_case(folder)


@pytest.fixture(scope="module")
def text(folder: Path) -> Case:
    return text_case(folder)


@pytest.fixture(scope="module")
def images(folder: Path) -> Case:
    return image_case(folder)


VENV_SCRIPT = """
import importlib, json, sys
for name in ("core", "flows", "tasks", "trainflow", "torch"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} is importable in the fresh venv")
import mlflow.pyfunc
import pandas as pd

table_dir, text_dir, image_dir, pngs, rows_csv, prompts_json, out = sys.argv[1:]
table = mlflow.pyfunc.load_model(table_dir).predict(pd.read_csv(rows_csv))
text = mlflow.pyfunc.load_model(text_dir).predict(json.load(open(prompts_json)), params={"max_new_bytes": 6})
encoded = [open(f"{pngs}/{name}", "rb").read() for name in sorted(__import__("os").listdir(pngs))]
image = mlflow.pyfunc.load_model(image_dir).predict(encoded)
json.dump({"table": table.to_dict(orient="list"), "text": text.to_dict(orient="list"),
           "image": image.to_dict(orient="list")}, open(out, "w"))
"""


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[Path]], Path]:
    """`install(requirement_files) -> python` of one venv per test session (no system site packages,
    no trainflow), pip-installed through the repo's constraints.txt."""
    folder = tmp_path_factory.mktemp("venv")
    installed: set[str] = set()

    def install(requirements: list[Path]) -> Path:
        python = folder / "bin" / "python"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
        lines = {line for r in requirements for line in r.read_text().split()}
        if not lines <= installed:
            files = [arg for r in requirements for arg in ("-r", str(r))]
            pip = [str(python), "-m", "pip", "install", "-q", *files, "-c", str(REPO / "constraints.txt")]
            done = subprocess.run(pip, capture_output=True, text=True, timeout=900, env=clean_env())
            assert done.returncode == 0, done.stderr[-3000:]
            installed.update(lines)
        return python

    return install


def clean_env() -> dict[str, str]:
    drop = ("PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"MLFLOW_DISABLE_TELEMETRY": "true"}


def test_the_model_loads_and_predicts_in_a_fresh_venv_without_trainflow(
    csv_people: Case,
    text: Case,
    images: Case,
    tracking: Tracking,
    fresh_venv: Callable[[list[Path]], Path],
    tmp_path: Path,
) -> None:
    table = tracking.download(tracking.log(csv_people, csv_people.export(".onnx"), "people-venv"), tmp_path / "t")
    gpt = tracking.download(tracking.log(text, text.export(".onnx"), "gpt-venv"), tmp_path / "g")
    picture = tracking.download(tracking.log(images, images.export(".onnx"), "images-venv"), tmp_path / "i")
    pngs = tmp_path / "pngs"  # the test images at other sizes, as files a user would send
    pngs.mkdir()
    raw_test = pd.read_pickle(images.store.local_path(images.data.raw_test_uri))["features"]
    sent = [Image.fromarray(p).resize((17 + 3 * k, 12 + 2 * k)) for k, p in enumerate(raw_test[:4])]
    for k, im in enumerate(sent):
        im.save(pngs / f"{k}.png")
    started = time.perf_counter()
    python = fresh_venv([table / "requirements.txt", gpt / "requirements.txt", picture / "requirements.txt"])
    installed = time.perf_counter() - started
    rows = people().head(20).drop(columns="label")
    rows.loc[0, "colour"], rows.loc[1, "height"] = "purple", np.nan
    rows.to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    work = tmp_path / "empty"
    work.mkdir()
    args = [table, gpt, picture, pngs, tmp_path / "rows.csv", tmp_path / "prompts.json", tmp_path / "out.json"]
    command = [str(python), "-c", VENV_SCRIPT, *map(str, args)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = time.perf_counter() - started
    out = json.loads((tmp_path / "out.json").read_text())

    raw = pd.read_csv(tmp_path / "rows.csv")
    pre = csv_people.pre
    x = pre["transformer"].transform(categories_as_strings(raw, pre["categorical"])).astype(np.float32)
    assert_classes(pd.DataFrame(out["table"]), csv_people.proba(x), csv_people.data.spec.class_names)
    pre = images.pre  # images of other sizes, PNG-encoded: decoded and resized in the venv as in training
    square = np.stack([square_image(np.asarray(im), pre["image_size"], pre["color"]) for im in sent])
    expected = images.proba(normalized(square, pre["pixel_mean"], pre["pixel_std"]))
    assert_classes(pd.DataFrame(out["image"]), expected, images.data.spec.class_names)
    for k, prompt in enumerate(PROMPTS):
        continuation, top, _ = greedy(text.model, prompt, 6)
        assert out["text"]["continuation"][k] == continuation
        assert out["text"]["top1_byte"][k] == top[0]

    started = time.perf_counter()  # the CLI a user would try first, in the same venv
    cli = [str(python.parent / "mlflow"), "models", "predict", "-m", str(table), "--env-manager", "local"]
    cli += ["-i", str(table / "serving_input_example.json"), "-t", "json", "-o", str(tmp_path / "cli.json")]
    done = subprocess.run(cli, cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = pd.DataFrame(json.loads((tmp_path / "cli.json").read_text())["predictions"])
    assert_classes(served, csv_people.proba(csv_people.x_test()[:5]), csv_people.data.spec.class_names)
    cli_s = time.perf_counter() - started
    print(f"fresh venv: install {installed:.1f} s, load+predict {predicted:.1f} s, CLI predict {cli_s:.1f} s")
