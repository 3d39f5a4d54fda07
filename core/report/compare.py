"""`trainflow compare`: the recent pipeline runs of one MLflow experiment side by side — the config values that
differ between them, the evaluate stage's key metrics, model size, batch-1 latency, cached stages — and the
best run by one metric. Reads MLflow only: parent runs tagged `trainflow.pipeline`, their stage child runs'
metrics (a cached stage's from its `result.json`).

    trainflow compare [--experiment NAME] [--metric M] [--last N] [--plot FILE] [--tracking-uri URI]
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from trainflow.core.errors import TrackingError, TrainflowError
from trainflow.core.tracking.backend import check_reachable, client_for
from trainflow.core.tracking.runs import PIPELINE_TAG, STAGE_TAG

DEFAULT_METRICS = ("test/accuracy", "test/perplexity")  # classification, language modelling
KEY_METRICS = ("test/accuracy", "test/f1_macro", "test/perplexity", "test/loss")
COST_METRICS = ("size_bytes", "latency_ms_p50")  # serialized weights, batch-1 latency
METRIC_STAGES = ("train", "evaluate")  # child runs whose metrics are compared; evaluate's win a shared name
_HIGHER_IS_BETTER = ("accuracy", "f1", "precision", "recall", "throughput", "per_s")  # anything else: lower
_MAX_CONFIG_COLUMNS = 8
_MAX_CELL = 24
_MAX_LISTED = 30  # experiment names an unknown --experiment lists


@dataclass(frozen=True)
class RunSummary:
    """One pipeline run as compared: its parent run's params and tags, its stage child runs' metrics."""

    run_id: str
    name: str
    started: datetime
    status: str
    params: dict[str, str]  # the flattened config (`optim.lr`) and `tuned.<path>`
    metrics: dict[str, float]
    cached_stages: str


@dataclass(frozen=True)
class Comparison:
    """What `trainflow compare` shows: the runs, the config keys that tell them apart, the metric to rank by."""

    tracking_uri: str
    experiment: str
    metric: str | None  # None: no run has an evaluate metric
    runs: list[RunSummary]  # newest first
    differing: list[str]  # config keys whose values are not the same in every run

    @property
    def higher_is_better(self) -> bool:
        return self.metric is not None and any(word in self.metric for word in _HIGHER_IS_BETTER)

    def best(self) -> RunSummary | None:
        """The run with the best value of the metric; None when no run has one."""
        scored = [run for run in self.runs if self.metric in run.metrics and math.isfinite(run.metrics[self.metric])]
        if not scored:
            return None
        sign = 1 if self.higher_is_better else -1
        return max(scored, key=lambda run: sign * run.metrics[self.metric])  # type: ignore[index]

    def label(self, run: RunSummary) -> str:
        """Run name, short id and the differing config values: what tells runs apart on a plot."""
        values = ", ".join(f"{key}={_cell(run.params.get(key))}" for key in self.differing[:_MAX_CONFIG_COLUMNS])
        return f"{run.name} {run.run_id[:8]}" + (f"\n{values}" if values else "")

    def text(self) -> str:
        """The printable table, newest run first, then the best run."""
        configs = self.differing[:_MAX_CONFIG_COLUMNS]
        shown = dict.fromkeys(m for m in (self.metric, *KEY_METRICS, *COST_METRICS) if m)
        metrics = [m for m in shown if any(m in run.metrics for run in self.runs)]
        header = ["run", "id", "started", "status", *configs, *metrics, "cached stages"]
        rows = [
            [run.name, run.run_id[:8], f"{run.started:%Y-%m-%d %H:%M}", run.status,
             *(_cell(run.params.get(key)) for key in configs), *(_number(run.metrics.get(m)) for m in metrics),
             run.cached_stages or "-"]
            for run in self.runs
        ]  # fmt: skip
        title = f"experiment {self.experiment!r} in {self.tracking_uri}: {len(self.runs)} pipeline run(s), newest first"
        lines = [title, *_aligned([header, *rows])]
        if len(self.differing) > len(configs):
            lines.append(f"also differ: {', '.join(self.differing[len(configs) :])}")
        if len(self.runs) > 1 and not self.differing:
            lines.append("the config is the same in every run")
        best = self.best()
        if self.metric is None or best is None:
            lines.append("no run has recorded the metrics to rank by")
        else:
            direction = "higher" if self.higher_is_better else "lower"
            lines.append(f"best by {self.metric} ({direction} is better): {best.name} {best.run_id[:8]} "
                         f"= {_number(best.metrics[self.metric])}")  # fmt: skip
        return "\n".join(lines)


def compare_runs(tracking_uri: str, experiment: str | None, metric: str | None, last: int) -> Comparison:
    """The `last` most recent pipeline runs of `experiment` (default: the experiment of the newest pipeline run).

    Args:
        metric: the metric to rank by, as MLflow names it (`test/accuracy`) or as the evaluate stage does
            (`accuracy`); default: the evaluate stage's accuracy, else its perplexity.

    Raises:
        TrackingError: the tracking URI cannot be opened.
        TrainflowError: `last` < 1, no such experiment, no pipeline runs in it, or an unknown metric.
    """
    if last < 1:
        raise TrainflowError(f"--last {last}: must be at least 1")
    client = _open(tracking_uri)
    experiment_id, name = _experiment(client, tracking_uri, experiment)
    parents = client.search_runs(
        [experiment_id], f"tags.`{PIPELINE_TAG}` = 'true'", order_by=["attributes.start_time DESC"], max_results=last
    )
    if not parents:
        raise TrainflowError(f"experiment {name!r} in {tracking_uri} has no pipeline runs (runs tagged {PIPELINE_TAG})")
    runs = [_summary(client, experiment_id, parent) for parent in parents]
    keys = sorted({key for run in runs for key in run.params})
    differing = [key for key in keys if len({run.params.get(key) for run in runs}) > 1]
    available = sorted({m for run in runs for m in run.metrics})
    return Comparison(tracking_uri, name, _chosen_metric(metric, available), runs, differing)


def plot_comparison(comparison: Comparison, path: Path) -> None:
    """A PNG dot chart of the metric per run, newest on top, the best in orange, labelled by run name and the
    differing config values. Dots, not bars: the axis fits the values, so 0.95 and 0.96 look different."""
    if comparison.metric is None:
        raise TrainflowError(f"--plot {path}: no run has recorded a metric to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = comparison.runs[::-1]  # the first row is drawn at the bottom
    values = [run.metrics.get(comparison.metric, math.nan) for run in runs]
    best = comparison.best()
    figure, ax = plt.subplots(figsize=(8, 0.6 * len(runs) + 1.5))
    for row, (run, value) in enumerate(zip(runs, values, strict=True)):
        is_best = best is not None and run.run_id == best.run_id
        ax.plot([value], [row], "o", color="tab:orange" if is_best else "tab:blue", markersize=9 if is_best else 7)
        ax.annotate(_number(value), (value, row), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(runs)), [comparison.label(run) for run in runs], fontsize=8)
    ax.set_ylim(-0.7, len(runs) - 0.3)
    ax.margins(x=0.2)
    ax.grid(axis="x", alpha=0.3)
    direction = "higher" if comparison.higher_is_better else "lower"
    ax.set_xlabel(f"{comparison.metric} ({direction} is better)")
    ax.set_title(f"experiment {comparison.experiment!r}: {len(runs)} pipeline run(s)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def _open(uri: str) -> Any:
    """A client on `uri`, checked readable. A missing SQLite file is an error, not a new empty database."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"tracking URI {uri}: no MLflow database at {uri.removeprefix('sqlite:///')}")
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    try:
        client = client_for(uri)
        client.search_experiments(max_results=1)
    except (MlflowException, SQLAlchemyError) as exc:
        raise TrackingError(f"tracking URI {uri}: cannot be opened ({str(exc).strip().splitlines()[0]})") from None
    return client


def _experiment(client: Any, uri: str, name: str | None) -> tuple[str, str]:
    """(id, name) of the named experiment, or of the one holding the newest pipeline run."""
    if name is not None:
        found = client.get_experiment_by_name(name)
        if found is None:  # e.g. a deployment's name, where the experiment is named by the config
            names = sorted(e.name for e in client.search_experiments())
            more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
            shown = ", ".join(names[:_MAX_LISTED]) + more
            raise TrainflowError(f"--experiment {name}: no such experiment in {uri}; experiments: {shown or 'none'}")
        return found.experiment_id, found.name
    ids = [e.experiment_id for e in client.search_experiments()]
    newest = client.search_runs(
        ids, f"tags.`{PIPELINE_TAG}` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not newest:
        raise TrainflowError(f"no pipeline runs in {uri} (runs tagged {PIPELINE_TAG}); run `trainflow run CONFIG`")
    experiment_id = newest[0].info.experiment_id
    return experiment_id, client.get_experiment(experiment_id).name


def _summary(client: Any, experiment_id: str, parent: Any) -> RunSummary:
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", order_by=["attributes.start_time ASC"]
    )
    metrics: dict[str, float] = {}
    for stage in METRIC_STAGES:
        runs = [run for run in children if run.data.tags.get(STAGE_TAG) == stage]
        finished = [run for run in runs if run.info.status == "FINISHED"] or runs
        if finished:
            metrics |= _stage_metrics(client, finished[-1])
    return RunSummary(
        run_id=parent.info.run_id,
        name=parent.info.run_name or parent.info.run_id[:8],
        started=datetime.fromtimestamp(parent.info.start_time / 1000),
        status=parent.info.status,
        params=dict(parent.data.params),
        metrics=metrics,
        cached_stages=parent.data.tags.get("trainflow.cached_stages", ""),
    )


def _stage_metrics(client: Any, run: Any) -> dict[str, float]:
    """A stage run's metrics. A cached stage's run logged no metrics, only its record (`result.json`): the numbers
    are read from there, named as tasks/context.py `log_result` and tasks/evaluate.py (`test/<metric>`) name them."""
    if run.data.metrics or run.data.tags.get("trainflow.cached") != "true":
        return dict(run.data.metrics)
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as progress_bar

    saved = progress_bar.get_raw()
    progress_bar.set("false")  # no progress bar on stderr under the table
    try:
        with tempfile.TemporaryDirectory() as folder:
            record = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", folder)).read_text())
    finally:
        progress_bar.unset() if saved is None else progress_bar.set(saved)
    numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if isinstance(record.get("metrics"), dict):  # EvaluateResult.metrics
        numbers |= {f"test/{k}": float(v) for k, v in record["metrics"].items()}
    return numbers


def _chosen_metric(given: str | None, available: list[str]) -> str | None:
    if given is None:
        preferred = [*(m for m in DEFAULT_METRICS if m in available), *(m for m in available if m.startswith("test/"))]
        return next(iter(preferred), None)  # no evaluate metric (every run failed before it): nothing to rank by
    for name in (given, f"test/{given}"):
        if name in available:
            return name
    raise TrainflowError(f"--metric {given}: not recorded by these runs; available: {', '.join(available) or 'none'}")


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]


def _cell(value: str | None) -> str:
    if value is None:
        return "-"
    return value if len(value) <= _MAX_CELL else value[: _MAX_CELL - 3] + "..."


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
