"""The run report of a real tiny pipeline run (LR range test, a 3-trial search, every stage) on Prefect's test
server with MLflow on a temporary SQLite file; and the renderer on its own."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_raw
from tests.flows.test_pipeline import Project
from trainflow.core.config import config_from_dict, load_config
from trainflow.core.report import write_report
from trainflow.core.report.blocks import Report, Section
from trainflow.core.report.render import render_html, render_markdown
from trainflow.core.report.sections import config_section
from trainflow.core.report.summary import summarize
from trainflow.core.storage.store import LocalStore

pytestmark = pytest.mark.slow  # the pipeline on Prefect's test server: left out of `pytest -m 'not slow'`

PNG = b"\x89PNG\r\n\x1a\n"
SPACE = {"optim.lr": {"type": "float", "log": True}, "model.dropout": {"type": "float", "low": 0.0, "high": 0.3}}


@pytest.fixture(scope="module")
def project(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(
        tmp_path_factory.mktemp("report"),
        optim={"lr": "auto"},
        tune={"lr_range_test": {"num_steps": 30},
              "hpo": {"enabled": True, "n_trials": 3, "max_epochs_per_trial": 2, "space": SPACE}},
        compress={"structured_pruning": {"enabled": False}, "distillation": {"enabled": False}},  # kept short
        publish={"registered_model_name": "report-model"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(project: Project) -> dict[str, Any]:
    return project.run()


@pytest.fixture(scope="module")
def markdown(project: Project, run: dict[str, Any]) -> str:
    return (project.root / "out" / "report.md").read_text()


@pytest.fixture(scope="module")
def page(project: Project, run: dict[str, Any]) -> str:
    return (project.root / "out" / "report.html").read_text()


def sections(markdown: str) -> dict[str, str]:
    """The Markdown report's `## ` sections by title."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def table(text: str, first_column: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with `first_column`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


class Links(HTMLParser):
    """Every src and href attribute of an HTML page, by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [(tag, name, value or "") for name, value in attrs if name in ("src", "href")]


def test_the_report_is_in_the_output_folder_and_the_mlflow_parent_run(
    project: Project, run: dict[str, Any], tmp_path: Path
) -> None:
    out = project.root / "out"
    client = MlflowClient(project.tracking_uri)
    logged = {a.path for a in client.list_artifacts(run["mlflow_run_id"], "report")}
    assert {"report/report.md", "report/report.html", "report/report_files"} <= logged
    images = {Path(a.path).name for a in client.list_artifacts(run["mlflow_run_id"], "report/report_files")}
    assert images == {p.name for p in (out / "report_files").iterdir()}
    for name in ("report.md", "report.html"):
        downloaded = client.download_artifacts(run["mlflow_run_id"], f"report/{name}", str(tmp_path))
        assert Path(downloaded).read_bytes() == (out / name).read_bytes()


def test_the_html_page_is_self_contained(page: str) -> None:
    parser = Links()
    parser.feed(page)
    images = [value for tag, name, value in parser.links if tag == "img"]
    assert len(images) >= 5  # LR curve, HPO history, training curves, confusion matrix, Pareto plot
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True).startswith(PNG)
    others = [(tag, value) for tag, name, value in parser.links if tag != "img"]
    assert all(tag == "a" and value.startswith("#") for tag, value in others), others
    assert "<script" not in page and "<link" not in page


def test_the_markdown_images_are_files_beside_it(project: Project, markdown: str) -> None:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) >= 5
    for link in links:
        assert link.startswith("report_files/")
        assert (project.root / "out" / link).read_bytes().startswith(PNG)


def test_the_sections_show_this_run(project: Project, run: dict[str, Any], markdown: str, page: str) -> None:
    stages, by_title = run["stages"], sections(markdown)
    assert list(by_title) == ["Run", "Config", "Data", "LR range test", "Hyperparameter search", "Training",
                              "Diagnosis", "Evaluation", "Compression", "Publish"]  # fmt: skip
    assert run["mlflow_run_id"] in by_title["Run"] and run["prefect_flow_run_id"] in by_title["Run"]
    assert run["config_sha256"] in by_title["Run"]
    assert table(by_title["Run"], "stage")[1] == ["lr_range_test", f"{stages['lr_range_test']['seconds']:.1f}", "no"]
    assert f"compress: recommended **{stages['compress']['recommended']}**: " in by_title["Run"]

    lr = run["tuned"]["optim.lr"]
    assert ["optim.lr", f"{lr:.4g}"] in table(by_title["Config"], "path")
    assert f"lr: {lr}" in by_title["Config"]  # the YAML block has the tuned value applied
    data, lr_range = stages["prepare_data"], stages["lr_range_test"]
    assert f"{data['n_train']:,} / {data['n_val']:,} / {data['n_test']:,}" in by_title["Data"]
    assert data["fingerprint"] in by_title["Data"]
    assert f"Suggested lr ({lr_range['rule']}): {lr_range['suggested_lr']:.4g}" in by_title["LR range test"]

    hpo = by_title["Hyperparameter search"]
    assert "3 trials:" in hpo
    trials = table(hpo, "trial")
    assert [row[0] for row in trials] == ["0", "1", "2"]
    assert {row[1] for row in trials} <= {"COMPLETE", "PRUNED"}
    assert "hpo_history.png" in hpo and ("hpo_importances.png" in hpo) == bool(stages["hpo_search"]["importances"])

    assert f"{stages['train']['epochs_run']} epoch(s)" in by_title["Training"]
    assert "training_curves.png" in by_title["Training"]
    assert "No findings" in by_title["Diagnosis"] and "diagnosis_layers.png" in by_title["Diagnosis"]  # healthy
    assert "doctor: no findings" in by_title["Run"]
    accuracy = stages["evaluate"]["metrics"]["accuracy"]
    assert ["accuracy", f"{accuracy:.4g}"] in table(by_title["Evaluation"], "test metric")
    assert f"Recommended: **{stages['compress']['recommended']}**." in by_title["Compression"]
    assert len(table(by_title["Compression"], "variant")) == len(stages["compress"]["variants"])

    store = LocalStore(project.root / "artifacts")
    manifest = json.loads(store.local_path(stages["publish"]["manifest_uri"]).read_text())
    weights = next(f for f in manifest["files"] if f["path"] == "model.pt")
    assert weights["sha256"] in by_title["Publish"] and weights["sha256"] in page
    version = stages["publish"]["registered_version"]
    assert f"Registered as report-model version {version}" in by_title["Publish"]
    assert f"Champion: {stages['publish']['champion_decision']}." in by_title["Publish"]


def test_a_skipped_stage_says_why_and_cached_ones_say_so(project: Project, run: dict[str, Any]) -> None:
    again = project.run("compress.enabled=false", out="no-compress")
    assert again["skipped"] == {"compress": "compress.enabled is false"}
    by_title = sections((project.root / "no-compress" / "report.md").read_text())
    assert by_title["Compression"].strip() == "skipped: compress.enabled is false"
    cached = {row[0]: row[2] for row in table(by_title["Run"], "stage")}
    assert cached["compress"] == "skipped: compress.enabled is false"
    assert cached["train"] == "yes" and cached["publish"] == "no"
    assert by_title["Training"].lstrip().startswith("cached:")
    assert not (project.root / "no-compress" / "report_files" / "compress_pareto.png").exists()


def test_a_cached_rerun_reads_back_what_the_report_made_and_reports_itself(
    project: Project, run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fully cached re-run's report draws no plot and opens no study (each fails here if made again): they come
    back from the store, while the ids and the cached statuses are the re-run's own."""

    def made_again(*args: Any) -> bytes:
        raise AssertionError("made again for unchanged inputs")

    monkeypatch.setattr("trainflow.core.report.results.training_curves_png", made_again)
    monkeypatch.setattr("trainflow.core.report.sections.importances_png", made_again)
    monkeypatch.setattr("trainflow.core.report.sections._read_trial_rows", made_again)
    monkeypatch.setattr("trainflow.core.report.diagnosis.layer_figures_png", made_again)

    again = project.run(out="again")

    assert all(info["cached"] for info in again["stages"].values())
    first, second = project.root / "out", project.root / "again"
    by_title, before = sections((second / "report.md").read_text()), sections((first / "report.md").read_text())
    assert again["mlflow_run_id"] in by_title["Run"] and run["mlflow_run_id"] not in by_title["Run"]
    assert again["prefect_flow_run_id"] in by_title["Run"]
    assert {row[2] for row in table(by_title["Run"], "stage")} == {"yes"}
    assert by_title["Training"].lstrip().startswith("cached:")
    assert table(by_title["Hyperparameter search"], "trial") == table(before["Hyperparameter search"], "trial")
    images = sorted(p.name for p in (second / "report_files").iterdir())
    assert {"training_curves.png", "diagnosis_layers.png"} <= set(images)
    assert images == sorted(p.name for p in (first / "report_files").iterdir())
    for name in images:
        assert (second / "report_files" / name).read_bytes() == (first / "report_files" / name).read_bytes()


def test_the_summary_is_one_content_as_text_and_markdown(run: dict[str, Any]) -> None:
    """What `trainflow run` prints and the Prefect artifact shows, with a password planted in a URL."""
    summary = json.loads(json.dumps(run))
    summary["stages"]["publish"]["manifest_uri"] = "s3://me:secret@minio:9000/models/manifest.json"
    shown = summarize(summary)
    text, markdown = shown.text(), shown.markdown()
    for rendered in (text, markdown):
        assert "secret" not in rendered and "model: s3://me:***@minio:9000/models/manifest.json" in rendered
        assert re.search(f"^tuned: .*optim\\.lr={run['tuned']['optim.lr']:.4g}", rendered, re.MULTILINE)
        assert f"test: accuracy={run['stages']['evaluate']['metrics']['accuracy']:.4f}, " in rendered
        version = run["stages"]["publish"]["registered_version"]
        assert f"registered: report-model version {version} (aliases: " in rendered
    stage_lines = re.findall(r"^(\w+) +([\d.]+)  (yes|no)$", text, re.MULTILINE)
    assert [list(line) for line in stage_lines] == table(markdown, "stage") and len(stage_lines) == 7
    recommended = run["stages"]["compress"]["recommended"]
    assert f"\ncompress: recommended {recommended}: " in text
    assert f"\ncompress: recommended **{recommended}**: " in markdown
    variants = [row[0] for row in table(markdown, "variant")]
    assert variants == [f"**{v['name']}** (recommended)" if v["name"] == recommended else v["name"]
                        for v in run["stages"]["compress"]["variants"]]  # fmt: skip
    assert re.search(r"^fp32 +torch +accuracy \d\.\d{4} +baseline", text, re.MULTILINE)


def test_missing_artifacts_are_reported_not_raised(project: Project, run: dict[str, Any], tmp_path: Path) -> None:
    """Without out_dir the report goes to MLflow only; here to a fresh run, so the run's own report stays."""
    summary = json.loads(json.dumps(run))
    compress, lr_range = summary["stages"]["compress"], summary["stages"]["lr_range_test"]
    compress["plot_uri"] = compress["plot_uri"] + ".gone"
    (tmp_path / "curve.json").write_text("not json")
    lr_range["curve_uri"] = (tmp_path / "curve.json").as_uri()
    summary["stages"]["train"]["mlflow_run_id"] = "0" * 32
    client = MlflowClient(project.tracking_uri)
    scratch = client.create_run(client.get_run(run["mlflow_run_id"]).info.experiment_id).info.run_id

    assert write_report(summary, load_config(project.config), None, client, scratch) is None

    markdown = Path(client.download_artifacts(scratch, "report/report.md", str(tmp_path))).read_text()
    by_title = sections(markdown)
    assert f"missing: Compression: quality against batch-1 latency ({compress['plot_uri']})" in by_title["Compression"]
    assert "missing: the LR curve" in by_title["LR range test"] and "lr_range_test.png" in by_title["LR range test"]
    assert "missing: the metric history" in by_title["Training"] and "training_curves.png" not in markdown
    images = {Path(a.path).name for a in client.list_artifacts(scratch, "report/report_files")}
    assert "compress_pareto.png" not in images and "lr_range_test.png" in images


def test_a_flow_that_ends_early_reports_the_stages_it_ran(
    project: Project, run: dict[str, Any], tmp_path: Path
) -> None:
    """The tune flow ends after hpo_search: the later sections say they were not run, and nothing fails."""
    summary = json.loads(json.dumps(run))
    for stage in ("train", "evaluate", "compress", "publish"):
        del summary["stages"][stage]
    client = MlflowClient(project.tracking_uri)
    scratch = client.create_run(client.get_run(run["mlflow_run_id"]).info.experiment_id).info.run_id

    paths = write_report(summary, load_config(project.config), tmp_path, client, scratch)

    assert paths is not None
    markdown, page = paths
    by_title = sections(markdown.read_text())
    assert by_title["Publish"].strip() == "not run: this flow run ended before publish."
    assert ["train", "", "not run"] in table(by_title["Run"], "stage")
    assert "hpo_history.png" in by_title["Hyperparameter search"]
    assert sorted(p.name for p in (tmp_path / "report_files").iterdir()) == sorted(
        ["lr_range_test.png", "hpo_history.png"]
        + (["hpo_importances.png"] if run["stages"]["hpo_search"]["importances"] else [])
    )
    assert page.is_file()


def test_values_are_escaped_in_html_and_markdown() -> None:
    evil = "<script>alert(1)</script>"
    config = config_from_dict(tiny_raw())
    report = Report("Run report: <b>x</b>", [config_section({"publish.registered_model_name": evil}, config),
                                             Section("Notes")])  # fmt: skip
    page = render_html(report)
    assert "<script" not in page and "<b>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # the tuned values table and the YAML block
    markdown = render_markdown(report, "report_files")
    assert "\\<script>alert(1)\\</script>" in markdown  # shown as text, not raw HTML
    assert f"registered_model_name: {evil}" in markdown  # as written inside the fenced YAML block


def test_passwords_in_config_urls_are_masked() -> None:
    raw = tiny_raw(
        tracking={"uri": "http://me:secret@mlflow:5000"}, tune={"hpo": {"storage": "postgresql://me:pw@db/x"}}
    )
    text = render_markdown(Report("r", [config_section({}, config_from_dict(raw))]), "report_files")
    assert "secret" not in text and ":pw@" not in text
    assert "uri: http://me:***@mlflow:5000" in text and "storage: postgresql://me:***@db/x" in text


def test_the_flow_run_shows_its_prefect_artifacts(run: dict[str, Any]) -> None:
    """Training progress (at 100% when done), the HPO trials and compression tables, the Markdown summary."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        only_this_run = ArtifactFilterFlowRunId(any_=[run["prefect_flow_run_id"]])
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=only_this_run))}
    assert (found["train-progress-config"].type, float(found["train-progress-config"].data)) == ("progress", 100.0)
    trials = json.loads(found["hpo-trials-config"].data)
    assert [row["trial"] for row in trials] == [0, 1, 2]
    assert [row["best"] for row in trials].count("yes") == 1
    variants = [row["variant"] for row in json.loads(found["compression-config"].data)]
    compressed = run["stages"]["compress"]
    assert variants == [f"{v['name']} (recommended)" if v["name"] == compressed["recommended"] else v["name"]
                        for v in compressed["variants"]]  # fmt: skip
    summary = found["run-summary-config"].data
    assert run["mlflow_run_id"] in summary and run["stages"]["publish"]["manifest_uri"] in summary
    assert summarize(run).markdown() in summary  # the stage table, results, compression and publication
    assert found["run-summary-config"].type == "markdown"
