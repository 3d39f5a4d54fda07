"""The pipeline flow on Prefect's test server with MLflow on a temporary SQLite file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_raw
from trainflow.core.publish import verify_manifest
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.backend import fluent_tracking_uri
from trainflow.flows.pipeline import training_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
STAGES = ["prepare_data", "train", "evaluate", "compress", "publish"]  # optim.lr set, no search: no tuning stage


class Project:
    """A config file, its store and its MLflow database in one temporary folder."""

    def __init__(self, root: Path, **sections: Any):
        self.root = root
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        raw = tiny_raw(**sections) | {"tracking": {"uri": self.tracking_uri, "experiment": "tests"},
                                       "store": {"uri": str(root / "artifacts")}}  # fmt: skip
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(raw))

    def run(self, *overrides: str, out: str = "out") -> dict[str, Any]:
        summary = training_pipeline(str(self.config), list(overrides), str(self.root / out))
        on_disk = json.loads((self.root / out / "summary.json").read_text())
        assert on_disk == json.loads(json.dumps(summary))
        return summary

    def children(self, parent_run_id: str) -> dict[str, Any]:
        client = MlflowClient(self.tracking_uri)
        runs = client.search_runs([_experiment(client)], f"tags.mlflow.parentRunId = '{parent_run_id}'")
        return {run.info.run_name: run for run in runs}


def _experiment(client: MlflowClient) -> str:
    return client.get_experiment_by_name("tests").experiment_id


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def first(project: Project) -> dict[str, Any]:
    return project.run()


def test_summary_holds_every_stage_result(first: dict[str, Any]) -> None:
    stages = first["stages"]
    assert list(stages) == STAGES
    assert not any(stage["cached"] for stage in stages.values())
    assert len(first["config_sha256"]) == 64 and first["prefect_flow_run_id"]
    data, trained, evaluated = stages["prepare_data"], stages["train"], stages["evaluate"]
    assert (data["n_train"], data["n_val"], data["n_test"]) == (124, 27, 27)
    assert len(data["fingerprint"]) == 64
    assert trained["epochs_run"] == 6 and trained["stopped_early"] is False
    assert trained["best_val_loss"] < 0.5 and trained["samples_per_s"] > 0
    assert trained["checkpoint_uri"].startswith("file://")
    assert evaluated["metrics"]["accuracy"] > 0.85
    assert {"accuracy", "f1_macro", "precision_macro", "recall_macro", "loss"} <= set(evaluated["metrics"])
    assert 0 < evaluated["latency_ms_p50"] <= evaluated["latency_ms_p95"]
    assert evaluated["size_bytes"] > 0
    recommended = stages["compress"]["recommended"]
    shipped = next(v for v in stages["compress"]["variants"] if v["name"] == recommended)
    names = [o["uri"].split("/publish-")[1].split("/", 1)[1] for o in stages["publish"]["objects"]]
    assert names == ["model.pt", "config.yaml", "evaluation.json", f"recommended/{shipped['uri'].rsplit('/', 1)[1]}",
                     "compression.md", "preprocessor.pkl", "manifest.json"]  # fmt: skip
    assert stages["publish"]["recommended"] == recommended
    assert all(len(o["sha256"]) == 64 and o["bytes"] > 0 for o in stages["publish"]["objects"])


def test_stages_nothing_needs_are_skipped_and_shown_as_skipped(first: dict[str, Any]) -> None:
    assert first["skipped"] == {
        "lr_range_test": "nothing uses its suggestion (optim.lr is 0.01 and no search takes optim.lr's bounds from "
        "it); set tune.lr_range_test.enabled: true to run it anyway",
        "hpo_search": "tune.hpo.enabled is false",
    }
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first["prefect_flow_run_id"]]))
        )
    states = {run.name.rsplit("-", 1)[0]: (run.state.name, run.state.message) for run in runs}
    assert states["lr_range_test"] == ("Skipped", first["skipped"]["lr_range_test"])
    assert states["hpo_search"] == ("Skipped", first["skipped"]["hpo_search"])
    assert {states[name][0] for name in STAGES} == {"Completed"}


def test_mlflow_has_a_parent_run_with_one_child_per_stage(project: Project, first: dict[str, Any]) -> None:
    client = MlflowClient(project.tracking_uri)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.batch_size"] == "16" and parent.data.params["data.name"] == "wine"
    assert parent.data.tags["trainflow.config_sha256"] == first["config_sha256"]
    assert parent.data.tags["trainflow.data_fingerprint"] == first["stages"]["prepare_data"]["fingerprint"]
    assert "mlflow.source.git.commit" in parent.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts

    children = project.children(first["mlflow_run_id"])
    assert sorted(children) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert (
        children["prepare_data"].data.tags["trainflow.data_fingerprint"]
        == first["stages"]["prepare_data"]["fingerprint"]
    )
    train_run = children["train"]
    assert train_run.info.run_id == first["stages"]["train"]["mlflow_run_id"]
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(5, first["stages"]["train"]["steps"] + 1, 5))
    assert len(client.get_metric_history(train_run.info.run_id, "val/loss")) == 6
    assert train_run.data.params["effective_batch_size"] == "16"
    evaluate_run = children["evaluate"]
    assert evaluate_run.data.metrics["test/accuracy"] == pytest.approx(
        first["stages"]["evaluate"]["metrics"]["accuracy"]
    )
    assert "plots/confusion_matrix.png" in {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "plots")}


def test_the_doctor_watched_the_training_and_found_nothing(project: Project, first: dict[str, Any]) -> None:
    """A healthy run: no finding in the record, the tag on the train run and the parent, diagnosis.json logged."""
    from trainflow.core.report.summary import summarize

    trained = first["stages"]["train"]
    assert trained["findings"] == [] and trained["diagnosis_uri"].endswith("/diagnosis.json")
    client = MlflowClient(project.tracking_uri)
    assert client.get_run(trained["mlflow_run_id"]).data.tags["trainflow.diagnosis"] == "none"
    assert client.get_run(first["mlflow_run_id"]).data.tags["trainflow.diagnosis"] == "none"
    assert "diagnosis.json" in {a.path for a in client.list_artifacts(trained["mlflow_run_id"])}
    diagnosis = json.loads(LocalStore(project.root / "artifacts").local_path(trained["diagnosis_uri"]).read_text())
    assert [m["step"] for m in diagnosis["measurements"]] == [1]  # 48 steps at every_steps 50
    assert "\ndoctor: no findings\n" in summarize(first).text()


def test_the_published_model_and_manifest(project: Project, first: dict[str, Any], tmp_path: Path) -> None:
    publish = first["stages"]["publish"]
    store = LocalStore(project.root / "artifacts")
    assert verify_manifest(publish["manifest_uri"], store) == []
    manifest = json.loads(store.local_path(publish["manifest_uri"]).read_text())
    assert manifest["data_fingerprint"] == first["stages"]["prepare_data"]["fingerprint"]
    assert manifest["config_sha256"] == first["config_sha256"]
    assert manifest["mlflow_train_run_id"] == first["stages"]["train"]["mlflow_run_id"]
    compressed = first["stages"]["compress"]
    assert manifest["recommended"]["name"] == compressed["recommended"]
    assert manifest["recommended"]["reason"] == compressed["reason"]
    import mlflow.pyfunc
    from sklearn.datasets import load_wine

    with fluent_tracking_uri(project.tracking_uri):
        model = mlflow.pyfunc.load_model(publish["mlflow_model_uri"])
    assert "MLFLOW_TRACKING_URI" not in os.environ, "a run's config must not become the environment's setting"
    raw = load_wine(as_frame=True)
    predicted = model.predict(raw.data.head(40))  # raw rows in: the preprocessing travels inside the model
    assert list(predicted.columns[:2]) == ["label", "proba_class_0"]
    assert (predicted["label"] == raw.target.head(40).map(lambda i: f"class_{i}")).mean() > 0.9

    # Damage a copy: the published folder belongs to the module's project, which other tests read.
    folder = Path(shutil.copytree(store.local_path(publish["manifest_uri"]).parent, tmp_path / "published"))
    copy_uri, model_file = (folder / "manifest.json").as_uri(), folder / "model.pt"
    original = model_file.read_bytes()
    model_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    assert verify_manifest(copy_uri, store) == ["model.pt: sha256 differs from the manifest"]
    model_file.write_bytes(original + b"x")
    assert verify_manifest(copy_uri, store) == [f"model.pt: {len(original) + 1} bytes, manifest says {len(original)}"]
    assert verify_manifest(publish["manifest_uri"], store) == [], "the project's own folder is untouched"


def test_a_second_identical_run_reuses_every_stage(project: Project, first: dict[str, Any]) -> None:
    again = project.run(out="again")
    assert all(again["stages"][name]["cached"] for name in STAGES)
    assert again["mlflow_run_id"] != first["mlflow_run_id"], "every run of the pipeline is its own MLflow run"
    for name in ("prepare_data", "train", "evaluate"):
        same = {k: v for k, v in again["stages"][name].items() if k not in ("seconds", "cached")}
        assert same == {k: v for k, v in first["stages"][name].items() if k not in ("seconds", "cached")}
    children = project.children(again["mlflow_run_id"])
    assert sorted(children) == sorted(STAGES)
    assert all(run.data.tags.get("trainflow.cached") == "true" for run in children.values())


def test_changing_one_section_reruns_that_stage_and_those_after_it(project: Project, first: dict[str, Any]) -> None:
    changed = project.run("train.max_epochs=3", out="changed")
    cached = {name: changed["stages"][name]["cached"] for name in STAGES}
    assert cached == {"prepare_data": True, "train": False, "evaluate": False, "compress": False, "publish": False}
    assert changed["stages"]["train"]["epochs_run"] == 3


def test_changing_only_compress_reruns_compress_and_publish_not_training(
    project: Project, first: dict[str, Any]
) -> None:
    changed = project.run("compress.pruning.sparsity=0.3", out="compress-changed")
    cached = {name: changed["stages"][name]["cached"] for name in STAGES}
    assert cached == {"prepare_data": True, "train": True, "evaluate": True, "compress": False, "publish": False}
    pruned = next(v for v in changed["stages"]["compress"]["variants"] if v["name"] == "pruned")
    assert pruned["sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_the_compress_stage_has_one_mlflow_run_per_variant_and_its_table(
    project: Project, first: dict[str, Any]
) -> None:
    compressed = first["stages"]["compress"]
    assert compressed["variants"][0]["name"] == "fp32" and compressed["threads"] == 1
    evaluated = first["stages"]["evaluate"]["metrics"]  # the fp32 row is the evaluate stage's model, same metrics
    for name in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "loss"):
        assert compressed["variants"][0]["metrics"][name] == pytest.approx(evaluated[name], rel=1e-5), name
    for v in compressed["variants"]:
        assert {"name", "runtime", "uri", "size_bytes", "params", "latency_ms_p50", "latency_ms_p95", "throughput",
                "metrics", "sparsity"} <= set(v)  # fmt: skip
    client = MlflowClient(project.tracking_uri)
    compress_run = project.children(first["mlflow_run_id"])["compress"]
    assert compress_run.data.tags["trainflow.recommended"] == compressed["recommended"]
    artifacts = {a.path for a in client.list_artifacts(compress_run.info.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/pareto.png"}
    nested = project.children(compress_run.info.run_id)
    variants = {name.removeprefix("variant/"): run for name, run in nested.items() if name.startswith("variant/")}
    assert sorted(variants) == sorted(v["name"] for v in compressed["variants"])
    recommended = variants[compressed["recommended"]]
    assert recommended.data.tags["trainflow.recommended"] == "True"
    shipped = next(v for v in compressed["variants"] if v["name"] == compressed["recommended"])
    assert recommended.data.metrics["latency_ms_p50"] == pytest.approx(shipped["latency_ms_p50"])
    onnx_variant = variants["fp32+onnx_int8"]  # every ONNX variant is also an MLflow model in the onnx flavor
    import mlflow.onnx

    with fluent_tracking_uri(project.tracking_uri):
        graph = mlflow.onnx.load_model(onnx_variant.data.tags["trainflow.onnx_model_uri"])
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.graph.node)
    trainings = sorted(name for name in nested if name.startswith("compress/"))
    assert trainings == ["compress/distilled", "compress/pruned", "compress/pruned_structured/round0"]
    assert all(run.info.status == "FINISHED" for run in nested.values())


def test_a_cached_record_whose_artifacts_are_gone_is_recomputed(project: Project, first: dict[str, Any]) -> None:
    store = LocalStore(project.root / "artifacts")
    plot = store.local_path(first["stages"]["evaluate"]["plot_uris"][0])
    record = store.root / ".cache" / "prefect" / plot.parent.name  # the evaluate record, named by its cache key
    saved = {path: path.read_bytes() for path in (plot, record)}
    try:
        plot.unlink()
        rerun = project.run(out="rerun")
        cached = {name: rerun["stages"][name]["cached"] for name in STAGES}
        assert cached["prepare_data"] and cached["train"]
        assert not cached["evaluate"]
        assert plot.exists()
        assert rerun["stages"]["evaluate"]["plot_uris"] == first["stages"]["evaluate"]["plot_uris"]
    finally:  # the recomputed record holds new latencies: put back what the module's other tests compare against
        for path, content in saved.items():
            path.write_bytes(content)


def test_mlflow_tracking_uri_from_the_environment_wins(
    project: Project, first: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    summary = project.run(out="env")
    assert summary["mlflow_tracking_uri"] == other
    client = MlflowClient(other)
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_tuning_stages_feed_training_and_nest_trials_in_mlflow(tmp_path: Path) -> None:
    space = {"optim.lr": {"type": "float", "log": True}, "model.dropout": {"type": "float", "low": 0.0, "high": 0.3}}
    tuned_project = Project(
        tmp_path,
        optim={"lr": "auto"},
        tune={"lr_range_test": {"num_steps": 40},
              "hpo": {"enabled": True, "n_trials": 3, "max_epochs_per_trial": 2, "space": space}},
    )  # fmt: skip
    summary = tuned_project.run()
    stages = summary["stages"]
    assert list(stages) == ["prepare_data", "lr_range_test", "hpo_search", "train", "evaluate", "compress", "publish"]
    suggested = stages["lr_range_test"]["suggested_lr"]
    assert stages["hpo_search"]["lr_bounds"] == pytest.approx([suggested / 10, suggested * 3])
    assert stages["hpo_search"]["n_trials"] == 3
    assert summary["tuned"] == stages["hpo_search"]["best_params"], "the search's optim.lr replaces the suggestion"
    config_uri = stages["publish"]["objects"][1]["uri"]  # model.pt, config.yaml, ...
    published = yaml.safe_load(LocalStore(tmp_path / "artifacts").local_path(config_uri).read_text())
    assert published["optim"]["lr"] == pytest.approx(summary["tuned"]["optim.lr"])
    assert published["model"]["dropout"] == pytest.approx(summary["tuned"]["model.dropout"])

    client = MlflowClient(tuned_project.tracking_uri)
    children = tuned_project.children(summary["mlflow_run_id"])
    assert set(children) == set(stages)
    trials = tuned_project.children(children["hpo_search"].info.run_id)
    assert sorted(trials) == ["trial-0", "trial-1", "trial-2"]
    assert all(run.data.tags["trainflow.trial_state"] in ("COMPLETE", "PRUNED") for run in trials.values())
    plots = {a.path for a in client.list_artifacts(children["lr_range_test"].info.run_id, "plots")}
    assert plots == {"plots/lr_range_test.png"}
    parent = client.get_run(summary["mlflow_run_id"])
    assert float(parent.data.params["tuned.optim.lr"]) == pytest.approx(summary["tuned"]["optim.lr"])


def test_a_data_file_rewritten_in_place_prepares_again(tmp_path: Path) -> None:
    """The config names the same path; what the file holds changed, so prepare_data must not be Cached."""
    from sklearn.datasets import load_wine

    table = load_wine(as_frame=True).frame
    csv = tmp_path / "wine.csv"
    table.to_csv(csv, index=False)
    csv_project = Project(tmp_path, compress={"enabled": False})
    raw = yaml.safe_load(csv_project.config.read_text())
    raw["data"] = {"source": "csv", "path": str(csv), "target": "target"}
    csv_project.config.write_text(yaml.safe_dump(raw))
    first_run = csv_project.run(out="first")
    table.loc[0, "alcohol"] += 1.0  # one value changed, same path and config
    table.to_csv(csv, index=False)
    second_run = csv_project.run(out="second")
    assert not second_run["stages"]["prepare_data"]["cached"]
    assert second_run["stages"]["prepare_data"]["fingerprint"] != first_run["stages"]["prepare_data"]["fingerprint"]
    third_run = csv_project.run(out="third")
    assert third_run["stages"]["prepare_data"]["cached"], "an unchanged file stays cached"


def test_an_image_folder_trains_publishes_its_class_names_and_serves_raw_images(tmp_path: Path) -> None:
    """A folder of PNGs with one bad file skipped, prepared as shards: counted in the record and the report, the
    manifest names the classes, and the published MLflow model answers class names for encoded images of another
    size."""
    import mlflow
    import numpy as np
    from PIL import Image

    from tests.core.folder_support import png_bytes, write_digits

    root = write_digits(tmp_path / "pictures", per_class=15, size=20, classes=3)
    (root / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nothing more")
    images = Project(tmp_path, compress={"enabled": False}, train={"max_epochs": 4})
    raw = yaml.safe_load(images.config.read_text())
    raw["data"] = {"source": "image_folder", "path": str(root), "image_size": 12, "color": "gray",
                   "skip_bad_files": True, "in_memory_max_mb": 0}  # fmt: skip
    raw["model"] = {"name": "cnn", "channels": [4, 8]}
    images.config.write_text(yaml.safe_dump(raw))
    summary = images.run()
    data = summary["stages"]["prepare_data"]
    assert data["spec"]["class_names"] == ["0", "1", "2"] and data["n_train"] + data["n_val"] + data["n_test"] == 45
    assert len(data["skipped_files"]) == 1 and "broken.png: not a readable image" in data["skipped_files"][0]
    assert data["layout"] == "shards"  # every stage after it read the arrays lazily, publish's example included
    report = (tmp_path / "out" / "report.html").read_text()
    assert "bad files skipped" in report and "broken.png" in report
    published = summary["stages"]["publish"]
    manifest = json.loads(LocalStore(tmp_path / "artifacts").local_path(published["manifest_uri"]).read_text())
    assert manifest["class_names"] == ["0", "1", "2"]
    pictures = [Image.open(p).resize((30, 26)) for p in sorted((root / "1").glob("*.png"))[:4]]
    with fluent_tracking_uri(images.tracking_uri):
        served = mlflow.pyfunc.load_model(published["mlflow_model_uri"])
        answer = served.predict([png_bytes(p) for p in pictures])
    assert list(answer.columns) == ["label", "proba_0", "proba_1", "proba_2"]
    assert set(answer["label"]) <= {"0", "1", "2"}
    np.testing.assert_allclose(answer[["proba_0", "proba_1", "proba_2"]].sum(axis=1), 1.0, atol=1e-6)
