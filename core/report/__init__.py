"""The run report: report.md and a self-contained report.html of one pipeline run, written into the run's
output folder and logged to the MLflow parent run under `report/`.

Built from summary.json's content (its summary: summary.py, which the CLI and the Prefect artifact show
too), the stage records' artifacts in the store and the MLflow metric history (sections.py, results.py),
drawn where the pipeline saved no plot (plots.py; kept in the store, so a re-run draws only what changed),
rendered by render.py. Called by flows/pipeline_run.py once every stage has succeeded, before the parent run
ends. Beside it, compare.py: `trainflow compare`, the pipeline runs of an experiment side by side.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainflow.core.config import Config
from trainflow.core.config.secrets import mask_secrets
from trainflow.core.report.blocks import Report, Sources
from trainflow.core.report.diagnosis import diagnosis_section
from trainflow.core.report.render import image_file, render_html, render_markdown
from trainflow.core.report.results import compress_section, evaluate_section, publish_section, train_section
from trainflow.core.report.sections import config_section, data_section, hpo_section, lr_range_test_section, overview
from trainflow.core.storage.store import open_store, resolved, write_atomic

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
IMAGE_DIR = "report_files"  # beside report.md, and beside it under the run's `report/` artifacts
ARTIFACT_DIR = "report"


def write_report(
    summary: dict[str, Any], config: Config, out_dir: Path | None, client: MlflowClient, run_id: str
) -> tuple[Path, Path] | None:
    """Write report.md (+ report_files/*.png) and report.html into `out_dir` and log them to MLflow run `run_id`.

    Args:
        summary: what `PipelineRun.summary()` returns (stage records, tuned values, skipped stages, ids).
        config: the run's config; the tuned values in `summary` are applied to it for display.
        out_dir: the run's output folder; None logs to MLflow only (written via a temporary folder).
        client: an MLflow client on the run's tracking URI.
        run_id: the pipeline's MLflow parent run.

    Returns:
        The paths of report.md and report.html in `out_dir`, or None when there is no `out_dir`.
    """
    report = build_report(summary, config, Sources(open_store(resolved(config.store)), client), run_id)
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="trainflow-report-") as tmp:
            _log(client, run_id, _write(report, Path(tmp)))
        return None
    files = _write(report, Path(out_dir))
    _log(client, run_id, files)
    log.info("report: %s", files[1])
    return files[0], files[1]


def build_report(summary: dict[str, Any], config: Config, sources: Sources, run_id: str) -> Report:
    """The report's sections in pipeline order (a skipped stage's section says why it was skipped)."""
    run = sources.client.get_run(run_id)  # the parent run: named after the config file
    return Report(
        f"Run report: {run.info.run_name or config.publish.name}",
        [
            overview(summary, config, run),
            config_section(summary.get("tuned") or {}, config),
            data_section(summary),
            lr_range_test_section(summary, sources),
            hpo_section(summary, config, sources),
            train_section(summary, sources),
            diagnosis_section(summary, sources),
            evaluate_section(summary, sources),
            compress_section(summary, sources),
            publish_section(summary, sources),
        ],
    )


def _write(report: Report, folder: Path) -> list[Path]:
    """The images, then report.md and report.html, each atomically; images of an earlier report there go.
    Returns the report's files, report.md and report.html first."""
    images = [folder / IMAGE_DIR / image_file(image) for image in report.images()]
    for image, path in zip(report.images(), images, strict=True):
        write_atomic(path, image.png)
    for stale in (folder / IMAGE_DIR).glob("*.png"):
        if stale not in images:
            stale.unlink()
    markdown, page = folder / "report.md", folder / "report.html"
    write_atomic(markdown, mask_secrets(render_markdown(report, IMAGE_DIR)).encode("utf-8"))
    write_atomic(page, mask_secrets(render_html(report)).encode("utf-8"))  # every URL's password, whatever holds it
    return [markdown, page, *images]


def _log(client: MlflowClient, run_id: str, files: list[Path]) -> None:
    """Under `report/`, laid out as on disk, so report.md's image links work in the MLflow UI's download too."""
    for path in files:
        folder = ARTIFACT_DIR if path.parent.name != IMAGE_DIR else f"{ARTIFACT_DIR}/{IMAGE_DIR}"
        client.log_artifact(run_id, str(path), folder)
