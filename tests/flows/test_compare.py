"""`trainflow compare` over real pipeline runs (Prefect's test server, MLflow on a temporary SQLite file), and how
a pipeline run presents itself in MLflow's UI: the experiment's kind, the run's source, its dataset inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.flows.test_pipeline import Project
from trainflow.core.report.compare import compare_runs
from trainflow.core.tracking.run_meta import DIGEST_LENGTH
from trainflow.core.tracking.runs import EXPERIMENT_KIND, Tracker
from trainflow.flows.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(tmp_path_factory.mktemp("compare"), compress={"enabled": False})


@pytest.fixture(scope="module")
def runs(project: Project) -> list[dict[str, Any]]:
    """Three pipeline runs, oldest first: lr 0.01, lr 0.05, and lr 0.01 again (every stage cached)."""
    return [project.run(out="a"), project.run("optim.lr=0.05", out="b"), project.run(out="c")]


def _compare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(out: str) -> list[dict[str, str]]:
    """The table's rows as {column: cell}: cells are separated by two or more spaces."""
    lines = out.splitlines()
    header = re.split(r"\s{2,}", lines[1])
    rows = [re.split(r"\s{2,}", line) for line in lines[2:] if re.match(r"config( \S+)*\s{2,}[0-9a-f]{8}\s", line)]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_compare_shows_the_config_values_that_differ_and_the_evaluate_metrics(
    project: Project, runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _compare(capsys, "--tracking-uri", project.tracking_uri)  # default: the newest run's experiment
    assert (code, err) == (0, "")
    assert out.startswith("experiment 'tests' in sqlite:///")
    rows = _table(out)
    assert [row["id"] for row in rows] == [run["mlflow_run_id"][:8] for run in reversed(runs)]  # newest first
    assert [row["optim.lr"] for row in rows] == ["0.01", "0.05", "0.01"]
    assert not {"model.hidden_sizes", "data.name", "train.batch_size", "seed"} & set(rows[0])  # the same everywhere
    accuracies = [run["stages"]["evaluate"]["metrics"]["accuracy"] for run in reversed(runs)]
    assert [row["test/accuracy"] for row in rows] == [f"{a:.4g}" for a in accuracies]
    assert list(rows[0])[4:6] == ["optim.lr", "test/accuracy"]  # config values, then the chosen metric first
    assert {"test/f1_macro", "test/loss", "size_bytes", "latency_ms_p50"} <= set(rows[0])
    assert rows[0]["cached stages"] == "prepare_data,train,evaluate,publish" and rows[1]["cached stages"] == (
        "prepare_data"
    )
    best = max(reversed(runs), key=lambda run: run["stages"]["evaluate"]["metrics"]["accuracy"])
    assert f"best by test/accuracy (higher is better): config {best['mlflow_run_id'][:8]} = " in out

    comparison = compare_runs(project.tracking_uri, "tests", "loss", last=2)  # `loss` names test/loss
    assert (comparison.metric, comparison.differing, comparison.higher_is_better) == ("test/loss", ["optim.lr"], False)
    assert [run.run_id for run in comparison.runs] == [runs[2]["mlflow_run_id"], runs[1]["mlflow_run_id"]]
    cached = comparison.runs[0].metrics  # read from the cached stages' result.json
    assert cached["test/accuracy"] == pytest.approx(runs[2]["stages"]["evaluate"]["metrics"]["accuracy"])
    assert cached["size_bytes"] == runs[2]["stages"]["evaluate"]["size_bytes"]


def test_compare_plots_the_metric_per_run(
    project: Project, runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "plots" / "compare.png"
    args = ["--tracking-uri", project.tracking_uri, "--experiment", "tests", "--metric", "test/f1_macro"]
    code, out, err = _compare(capsys, *args, "--last", "2", "--plot", str(plot))
    assert (code, err) == (0, "")
    assert len(_table(out)) == 2 and out.rstrip().endswith(f"plot: {plot}")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


USER_ERRORS = [  # arguments -> the one line on stderr
    (["--experiment", "nope"], r"--experiment nope: no such experiment in sqlite:///\S+/mlflow\.db; experiments: .*"),
    (["--experiment", "empty"], r"experiment 'empty' in \S+ has no pipeline runs \(runs tagged trainflow\.pipeline\)"),
    (["--metric", "nope"], r"--metric nope: not recorded by these runs; available: best_step, .*, test/accuracy, .*"),
    (["--last", "0"], r"--last 0: must be at least 1"),
]


@pytest.mark.parametrize(("args", "message"), USER_ERRORS, ids=["experiment", "no-runs", "metric", "last"])
def test_compare_user_errors_are_one_line(
    project: Project,
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    client = MlflowClient(project.tracking_uri)
    if client.get_experiment_by_name("empty") is None:
        client.create_experiment("empty")
    code, out, err = _compare(capsys, "--tracking-uri", project.tracking_uri, *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and re.fullmatch(f"error: {message}\n", err)


def test_an_unknown_experiment_lists_the_experiments_there_are(
    project: Project, runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A user naturally tries the deployment's name (`wine_mlp`); the experiment is named after the config."""
    code, out, err = _compare(capsys, "--tracking-uri", project.tracking_uri, "--experiment", "wine_mlp")
    assert (code, out) == (2, "")
    names = sorted(e.name for e in MlflowClient(project.tracking_uri).search_experiments())
    assert "tests" in names
    assert err == (
        f"error: --experiment wine_mlp: no such experiment in {project.tracking_uri}; experiments: {', '.join(names)}\n"
    )


def test_compare_does_not_create_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _compare(capsys, "--tracking-uri", f"sqlite:///{tmp_path}/none/mlflow.db")
    assert (code, out) == (2, "")
    assert (
        err
        == f"error: tracking URI sqlite:///{tmp_path}/none/mlflow.db: no MLflow database at {tmp_path}/none/mlflow.db\n"
    )
    assert not (tmp_path / "none").exists()


def test_the_run_shows_its_source_and_its_dataset_splits(project: Project, runs: list[dict[str, Any]]) -> None:
    client = MlflowClient(project.tracking_uri)
    assert client.get_experiment_by_name("tests").tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    parent = client.get_run(runs[0]["mlflow_run_id"])
    tags = parent.data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == (str(project.config), "JOB")
    assert tags["trainflow.config_path"] == str(project.config.resolve())
    data = runs[0]["stages"]["prepare_data"]
    inputs = {i.dataset.name: i for i in parent.inputs.dataset_inputs}
    assert sorted(inputs) == ["wine-test", "wine-train", "wine-val"]
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"wine-train": "train", "wine-val": "validation", "wine-test": "testing"}
    for split, dataset_input in inputs.items():
        dataset = dataset_input.dataset
        assert dataset.digest == data["fingerprint"][:DIGEST_LENGTH]
        assert (dataset.source_type, json.loads(dataset.source)) == ("code", {"uri": "sklearn:wine"})
        assert json.loads(dataset.profile)["num_rows"] == data[f"n_{split.removeprefix('wine-')}"]
    cached = client.get_run(runs[2]["mlflow_run_id"]).inputs.dataset_inputs  # a cached prepare_data logs them too
    assert len(cached) == 3


def test_an_existing_experiment_gets_its_kind_but_keeps_one_it_has(project: Project) -> None:
    uri = project.tracking_uri  # creating a fresh database takes seconds
    client = MlflowClient(uri)
    client.create_experiment("plain")
    client.create_experiment("genai", tags={EXPERIMENT_KIND[0]: "genai_development"})
    assert Tracker.for_experiment(uri, "plain").client.get_experiment_by_name("plain").tags[EXPERIMENT_KIND[0]] == (
        "custom_model_development"
    )
    assert Tracker.for_experiment(uri, "genai").client.get_experiment_by_name("genai").tags[EXPERIMENT_KIND[0]] == (
        "genai_development"
    )
