"""The `trainflow` command as a user runs it: a real subprocess in an empty folder.

A user error (bad config, bad data, unusable store) exits 2 with one `error: ` line per problem naming
the field or file, no traceback, and, when caught before the pipeline starts, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainflow.core.config import load_config

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "configs" / "digits.yaml"
MLP_ON = "model: {{name: mlp}}\ndata: {{source: csv, path: {path}, target: label}}\n"
WINE = "data: {source: sklearn, name: wine}\nmodel: {name: mlp}\n"


def trainflow(cwd: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "trainflow", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def listing(folder: Path) -> set[str]:
    """Every file and folder below `folder`, as relative paths."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def write_table(path: Path, rows: int = 30, **extra_columns: list[object]) -> Path:
    rng = np.random.default_rng(0)
    labels = (["x", "y", "z"] * rows)[:rows]
    frame = pd.DataFrame({"a": rng.normal(size=rows), "b": rng.normal(size=rows), "label": labels, **extra_columns})
    frame.to_csv(path, index=False)
    return path


def _table(cwd: Path) -> None:
    write_table(cwd / "table.csv")


def _no_target(cwd: Path) -> None:
    path = write_table(cwd / "table.csv")
    pd.read_csv(path).drop(columns="label").to_csv(path, index=False)


def _unreadable(cwd: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read any file")
    write_table(cwd / "secret.csv").chmod(0)


# (id, files the test creates in the cwd, config.yaml text, command line after the config, error lines as regexes)
# `{cwd}` in a regex stands for the escaped absolute path of the cwd.
PREFLIGHT_CASES = [
    (
        "validate: unknown key",
        {},
        WINE + "train: {bach_size: 32}\n",
        ["validate"],
        [r"config\.yaml: train\.bach_size: unknown key; did you mean batch_size\?"],
    ),
    (
        "validate: bad literal",
        {},
        WINE + "train: {precision: fp8}\n",
        ["validate"],
        [r"config\.yaml: train\.precision: 'fp8' is not one of fp32, bf16, fp16"],
    ),
    (
        "validate: several problems, one line each",
        {},
        WINE + "seed: -1\ntrain: {precision: fp8, device: gpu}\nstore: {uri: 's3://ab'}\n",
        ["validate"],
        [
            r"config\.yaml: seed: -1 must be >= 0",
            r"config\.yaml: train\.precision: 'fp8' is not one of fp32, bf16, fp16",
            r"config\.yaml: train\.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps",
            r"config\.yaml: store\.uri: 's3://ab': bucket name 'ab' must be 3 to 63 characters long",
        ],
    ),
    (
        "validate: invalid YAML",
        {},
        "seed: 0\ntrain: batch_size: 32\n",
        ["validate"],
        [r"config\.yaml: line 2: invalid YAML: mapping values are not allowed here"],
    ),
    (
        "validate: top level not a mapping",
        {},
        "- seed\n",
        ["validate"],
        [r"config\.yaml: expected a mapping of sections at the top level, found list"],
    ),
    (
        "validate: bad --set syntax",
        {},
        WINE,
        ["validate", "--set", "train.batch_size"],
        [r"--set train\.batch_size: expected section\.key=value"],
    ),
    (
        "run: bad --set value",
        {"table.csv": _table},
        MLP_ON.format(path="table.csv"),
        ["run", "--set", "train.batch_size=0"],
        [r"--set: train\.batch_size: 0 must be >= 1 \(or one of auto\)"],
    ),
    (
        "run: csv file missing",
        {},
        MLP_ON.format(path="missing.csv"),
        ["run"],
        [r"data\.path: file 'missing\.csv' not found"],
    ),
    (
        "run: data.path is a folder",
        {"folder": lambda cwd: (cwd / "folder").mkdir()},
        MLP_ON.format(path="folder"),
        ["run"],
        [r"data\.path: 'folder' is not a file"],
    ),
    (
        "run: csv without the target column",
        {"table.csv": _no_target},
        MLP_ON.format(path="table.csv"),
        ["run"],
        [r"table\.csv: target column 'label' \(data\.target\) not found; columns are: a, b"],
    ),
    (
        "run: empty csv",
        {"empty.csv": lambda cwd: (cwd / "empty.csv").write_bytes(b"")},
        MLP_ON.format(path="empty.csv"),
        ["run"],
        [r"empty\.csv: file is empty"],
    ),
    (
        "run: parquet source on a csv file",
        {"table.csv": _table},
        "model: {name: mlp}\ndata: {source: parquet, path: table.csv, target: label}\n",
        ["run"],
        [r"table\.csv: cannot be read as parquet \(ArrowInvalid: .*\)"],
    ),
    (
        "run: text shorter than seq_len",
        {"short.txt": lambda cwd: (cwd / "short.txt").write_text("hello world")},
        "model: {name: gpt, n_embd: 32, n_head: 2}\ndata: {source: text, path: short.txt, seq_len: 16}\n",
        ["run"],
        [
            r"short\.txt: data\.seq_len=16 is longer than the smallest split \(1 of 11 bytes\); "
            r"lower data\.seq_len or use a larger text"
        ],
    ),
    (
        "run: gpt on sklearn data",
        {},
        "model: {name: gpt}\ndata: {source: sklearn, name: wine}\n",
        ["run"],
        [r"model\.name: 'gpt' is for language modelling \(data\.source: text\) but the data is for classification; "
         r"use data\.source: text"],
    ),
    (
        "run: cnn on a table",
        {"table.csv": _table},
        "model: {name: cnn}\ndata: {source: csv, path: table.csv, target: label}\n",
        ["run"],
        [r"model\.name: 'cnn' needs image data \(C, H, W\), such as data\.name: digits, but each sample of this "
         r"data has 1 dimension\(s\); use mlp"],
    ),
    (
        "run: mlp on text",
        {},
        "model: {name: mlp}\ndata: {source: text}\n",
        ["run"],
        [r"model\.name: 'mlp' is for classification but the data is for language modelling \(data\.source: text\); "
         r"use gpt, or a classification data source"],
    ),
    (
        "run: store path is a file",
        {"table.csv": _table},
        MLP_ON.format(path="table.csv") + "store: {uri: table.csv}\n",
        ["run"],
        [r"store\.uri: {cwd}/table\.csv is a file, not a folder"],
    ),
    (
        "run: tracking server unreachable",
        {"table.csv": _table},
        MLP_ON.format(path="table.csv") + "tracking: {uri: 'http://127.0.0.1:9'}\n",
        ["run"],
        [r"tracking\.uri: MLflow server http://127\.0\.0\.1:9 is not reachable \(.*\)"],
    ),
    (
        "run: csv not readable",
        {"secret.csv": _unreadable},
        MLP_ON.format(path="secret.csv"),
        ["run"],
        [r"data\.path: cannot read 'secret\.csv' \(Permission denied\)"],
    ),
    ("run: empty config file", {}, "", ["run"], [r"config\.yaml: the file is empty; .*"]),
    ("run: config without data", {}, "model: {name: mlp}\n", ["run"], [r"config\.yaml: data: required but missing"]),
    (
        "run: csv with an infinite value",
        {"table.csv": lambda cwd: write_table(cwd / "table.csv", c=[1.0] * 29 + [float("inf")])},
        MLP_ON.format(path="table.csv"),
        ["run"],
        [r"table\.csv: column 'c' has 1 row\(s\) with an infinite value; replace or drop them"],
    ),
    (
        "run: csv with an all-empty column",
        {"table.csv": lambda cwd: write_table(cwd / "table.csv", c=[None] * 30)},
        MLP_ON.format(path="table.csv"),
        ["run"],
        [r"table\.csv: column 'c' has no values"],
    ),
    (
        "run: csv with a single class",
        {"table.csv": lambda cwd: write_table(cwd / "table.csv", label=["x"] * 30)},
        MLP_ON.format(path="table.csv"),
        ["run"],
        [r"table\.csv: target has a single class \('x'\); classification needs two or more"],
    ),
    (
        "run: csv with a missing label",
        {"table.csv": lambda cwd: write_table(cwd / "table.csv", label=["x", "y", "z"] * 9 + ["x", "y", None])},
        MLP_ON.format(path="table.csv"),
        ["run"],
        [r"table\.csv: target column 'label' has 1 missing labels"],
    ),
    (
        "run: csv with too few samples of a class",
        {"table.csv": lambda cwd: write_table(cwd / "table.csv", label=["x", "y"] * 14 + ["z", "z"])},
        MLP_ON.format(path="table.csv"),
        ["run"],
        [r"table\.csv: class 'z' has 2 sample\(s\); a stratified train/val/test split needs at least 3 per class"],
    ),
    (
        "run: csv with a free-text column",
        {"ids.csv": lambda cwd: write_table(cwd / "ids.csv", rows=90, name=[f"id{i}" for i in range(90)])},
        MLP_ON.format(path="ids.csv"),
        ["run"],
        [r"ids\.csv: column 'name' is non-numeric with 90 distinct values \(more than 64\), so it cannot be one-hot "
         r"encoded; drop it or encode it first"],
    ),
    (
        "run: a factory that cannot be imported",
        {},
        "data: {source: sklearn, name: wine}\nmodel: {name: factory, factory: 'no_such_module:build'}\n",
        ["run"],
        [r"model\.factory: cannot import 'no_such_module:build' \(No module named 'no_such_module'\)"],
    ),
    (
        "run: early stopping on a metric the task has not",
        {},
        WINE + "train: {early_stopping: {monitor: val/perplexity}}\n",
        ["run"],
        [r"train\.early_stopping\.monitor: 'val/perplexity' is not an evaluation metric of classification; "
         r"available: val/loss, val/accuracy"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("files", "config", "args", "errors"),
    [
        pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if c[0].startswith("run:") else [])
        for c in PREFLIGHT_CASES
    ],
)  # `run` imports the whole pipeline in each subprocess (2-3 s): the slow ones
def test_user_error_is_one_line_and_writes_nothing(
    tmp_path: Path, files: dict[str, Callable[[Path], object]], config: str, args: list[str], errors: list[str]
) -> None:
    for make in files.values():
        make(tmp_path)
    (tmp_path / "config.yaml").write_text(config)
    before = listing(tmp_path)
    assert before == {*files, "config.yaml"}

    result = trainflow(tmp_path, args[0], "config.yaml", *args[1:])

    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert len(lines) == len(errors), result.stderr
    cwd = re.escape(str(tmp_path.resolve()))
    for line, error in zip(lines, errors, strict=True):
        assert re.fullmatch("error: " + error.replace("{cwd}", cwd), line), line
    assert listing(tmp_path) == before  # no mlflow.db, artifacts/, mlruns/ or out/


def test_missing_config_file(tmp_path: Path) -> None:
    for command in ("validate", "run"):
        result = trainflow(tmp_path, command, "nope.yaml")
        assert result.returncode == 2
        assert result.stderr.splitlines() == ["error: nope.yaml: config file not found"]
        assert "Traceback" not in result.stdout
    assert listing(tmp_path) == set()


def test_validate_shipped_config(tmp_path: Path) -> None:
    result = trainflow(tmp_path, "validate", str(DIGITS))
    assert result.returncode == 0, result.stderr
    sha = load_config(DIGITS).sha256()
    assert result.stdout.splitlines() == [f"{DIGITS}: valid (config sha256 {sha[:12]})"]
    assert result.stderr == ""
    assert listing(tmp_path) == set()


def test_validate_applies_set(tmp_path: Path) -> None:
    result = trainflow(tmp_path, "validate", str(DIGITS), "--set", "train.batch_size=32")
    assert result.returncode == 0, result.stderr
    sha = load_config(DIGITS, ["train.batch_size=32"]).sha256()
    assert sha != load_config(DIGITS).sha256()
    assert f"(config sha256 {sha[:12]})" in result.stdout


@pytest.mark.slow
def test_user_error_inside_the_pipeline_is_one_line(tmp_path: Path) -> None:
    """A user factory that returns no nn.Module is only found out when the train stage calls it."""
    (tmp_path / "config.yaml").write_text(
        "data: {source: sklearn, name: wine}\nmodel: {name: factory, factory: 'tests.core.factories:not_a_module'}\n"
        "optim: {lr: 0.01}\n"
    )

    result = trainflow(tmp_path, "run", "config.yaml")

    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: model.factory: 'tests.core.factories:not_a_module' returned dict, not a torch.nn.Module"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # no summary for a failed run


SYS_MODULES_AT_EXIT = """
import atexit, json, os, sys
atexit.register(lambda: json.dump(sorted(sys.modules), open(os.environ["SYS_MODULES_FILE"], "w")))
"""


# What a run printed that nobody could act on: MLflow's download progress bars, its warning that the ONNX models
# declared a CUDA provider this machine lacks, its pickling warning and its database set-up lines
NOISE = ("Downloading artifacts", "CUDAExecutionProvider", "Passing a Python object", "Creating initial MLflow")


@pytest.mark.slow
def test_a_run_on_prefects_temporary_server_ends_cleanly_and_a_rerun_is_cached(tmp_path: Path) -> None:
    """The path `make demo` takes: the installed `trainflow` command from a folder outside the checkout, no
    PREFECT_API_URL, so the CLI boots Prefect's temporary server while it imports the pipeline, and leaves
    without the interpreter's teardown (flows/cli.py `_entry`). Every module it loaded is `trainflow.*`: none
    under the checkout's folder names (`core`, `tasks`, ...), which a missed `import core` would load; a cached
    re-run loads no stage's algorithm. The console shows the stages, the summary and Prefect's, not MLflow's `NOISE`."""
    (tmp_path / "config.yaml").write_text(WINE + "optim: {lr: 0.01}\ntrain: {max_epochs: 2}\n")
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SYS_MODULES_AT_EXIT)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(tmp_path / "hook"), "SYS_MODULES_FILE": str(tmp_path / "modules.json")}  # fmt: skip
    command = [str(Path(sys.executable).with_name("trainflow")), "run", "config.yaml"]
    for attempt in ("first", "again"):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        modules = json.loads((tmp_path / "modules.json").read_text())
        assert {"trainflow.tasks.train", "trainflow.flows.pipeline"} <= set(modules)
        stage_work = {"trainflow.core.train", "trainflow.core.compress", "onnx", "sklearn"}  # loaded by stages that run
        assert stage_work & set(modules) == (stage_work if attempt == "first" else set()), attempt
        assert [m for m in modules if m.split(".")[0] in ("core", "tasks", "flows", "deployments")] == []
        assert "Error logging to API" not in done.stderr, "logs were sent after the server stopped"
        assert [noise for noise in NOISE if noise in done.stdout + done.stderr] == [], done.stderr[-3000:]
        summary = (tmp_path / "out" / "summary.json").read_text()
        stages = re.findall(r"^(\w+) +[\d.]+  (yes|no)$", done.stdout, re.MULTILINE)
        assert [name for name, _ in stages] == ["prepare_data", "train", "evaluate", "compress", "publish"], done.stdout
        assert re.search(r"^compress: recommended \S+: ", done.stdout, re.MULTILINE), done.stdout  # and its table
        assert re.search(r"^fp32 +torch +accuracy \d\.\d{4} +baseline", done.stdout, re.MULTILINE), done.stdout
        assert {cached for _, cached in stages} == ({"no"} if attempt == "first" else {"yes"}), summary
        port = re.search(r"Stopping temporary server on http://127\.0\.0\.1:(\d+)", done.stderr)
        assert port, done.stderr[-2000:]
        with socket.socket() as probe:  # the server process is gone, not orphaned
            assert probe.connect_ex(("127.0.0.1", int(port.group(1)))) != 0
