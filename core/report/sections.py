"""The report's sections up to training: the run overview, the config and its tuned values, the data,
the LR range test and the HPO search. Each stage's section says when the stage was skipped or cached.
Later stages: results.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel

from trainflow.core.config import Config
from trainflow.core.config.secrets import mask_secrets
from trainflow.core.errors import ConfigError
from trainflow.core.records import HPOSearchResult, LRRangeTestResult, PrepareDataResult
from trainflow.core.report.blocks import Code, Image, Section, Sources, Table, Text, facts, fmt
from trainflow.core.report.plots import importances_png
from trainflow.core.report.summary import diagnosis_lines, summarize

if TYPE_CHECKING:
    from mlflow.entities import Run

R = TypeVar("R", bound=BaseModel)


def overview(summary: dict[str, Any], config: Config, run: Run) -> Section:
    """Who, when and where: the run's ids; then the run's summary (core/report/summary.py) without the
    compression table, which the Compression section shows whole."""
    section = Section("Run")
    started = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc)
    section.add(
        facts({
            "run": run.info.run_name,
            "flow": run.data.tags.get("trainflow.flow") or None,
            "published as": config.publish.name,
            "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "MLflow run id": summary["mlflow_run_id"],
            "MLflow tracking URI": mask_secrets(summary["mlflow_tracking_uri"]),
            "MLflow experiment id": summary.get("mlflow_experiment_id"),
            "Prefect flow run id": summary.get("prefect_flow_run_id"),
            "config sha256": summary["config_sha256"],
            "artifact store": summary.get("store_uri"),
        })
    )  # fmt: skip
    stages, skipped = summary["stages"], summary["skipped"]
    cached = [name for name, info in stages.items() if info["cached"]]
    section.add(
        Text(f"{len(stages)} stage(s) ran ({len(cached)} cached: {', '.join(cached) or 'none'}), "
             f"{len(skipped)} skipped: {', '.join(skipped) or 'none'}."),
        *summarize(summary).blocks(compression_table=False),
    )  # fmt: skip
    return section


def config_section(tuned: dict[str, Any], config: Config) -> Section:
    """The tuned values (dotted path -> value) and the config training used, as YAML."""
    section = Section("Config")
    if tuned:
        section.add(Text("Values set by the tuning stages:"), Table(["path", "tuned value"],
                    [[path, fmt(value)] for path, value in tuned.items()]))  # fmt: skip
    else:
        section.add(Text("No tuned values: training used the config's values."))
    resolved, note = with_tuned(config, tuned)
    text = mask_secrets(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))  # a URL's password
    return section.add(Code(f"config.yaml ({note})", text, "yaml"))


def with_tuned(config: Config, tuned: dict[str, Any]) -> tuple[Config, str]:
    """The config with the tuned values applied (typed by the schema, as `core.tuning.plan.tuned` applies them;
    the run's tuned config stays as it is), and a note saying so."""
    if not tuned:
        return config, "as given"
    try:
        return config.with_values(tuned), "tuned values applied"
    except ConfigError as exc:  # a report shows, it does not judge
        return config, f"as given; the tuned values above could not be applied here: {exc}"


def _skipped(lines: list[str]) -> str | None:
    """data.skip_bad_files: how many, and the first few with why."""
    if not lines:
        return None
    shown = "; ".join(lines[:3])
    return f"{len(lines)}: {shown}" + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")


def data_section(summary: dict[str, Any]) -> Section:
    def build(section: Section, r: PrepareDataResult) -> None:
        section.add(
            facts({
                "source": r.source,
                "task": r.spec.task,
                "train / val / test": f"{r.n_train:,} / {r.n_val:,} / {r.n_test:,}",
                "input shape": list(r.spec.input_shape),
                "classes" if r.spec.task == "classification" else "vocabulary": r.spec.n_classes,
                "class names": ", ".join(r.spec.class_names) or None,
                "bad files skipped": _skipped(r.skipped_files),
                "fingerprint": r.fingerprint,
                "prepared arrays": r.uri,
                "preprocessor": r.preprocessor_uri,
            })
        )  # fmt: skip

    return stage_section(summary, "prepare_data", "Data", PrepareDataResult, build)


def lr_range_test_section(summary: dict[str, Any], sources: Sources) -> Section:
    def build(section: Section, r: LRRangeTestResult) -> None:
        chosen = f"{r.suggested_lr:.4g}" if r.suggested_lr is not None else "none"
        section.add(
            Text(f"Suggested lr ({r.rule}): {chosen}. {r.reason}"),
            facts({"steps run": r.num_steps_run, "diverged": r.diverged}),
            Table(["rule", "suggested lr"], [[rule, fmt(lr) if lr is not None else "none"]
                                             for rule, lr in r.suggestions.items()]),
        )  # fmt: skip
        curve = sources.json(r.curve_uri, "the LR curve", section)
        if isinstance(curve, dict) and curve.get("lr") and curve.get("loss"):
            finite = [(lr, loss) for lr, loss in zip(curve["lr"], curve["loss"], strict=False) if loss == loss]
            low = min(finite, key=lambda point: point[1]) if finite else (float("nan"), float("nan"))
            section.add(Text(f"Curve: {len(curve['lr'])} points, lr {min(curve['lr']):.3g} to {max(curve['lr']):.3g}; "
                             f"lowest loss {low[1]:.4g} at lr {low[0]:.3g}."))  # fmt: skip
        sources.png(r.plot_uri, "lr_range_test", "LR range test: loss against learning rate", section)
        if r.findings:  # train.diagnostics.in_search: the doctor watched the sweep
            section.add(*diagnosis_lines([f.model_dump() for f in r.findings]))

    return stage_section(summary, "lr_range_test", "LR range test", LRRangeTestResult, build)


def hpo_section(summary: dict[str, Any], config: Config, sources: Sources) -> Section:
    def build(section: Section, r: HPOSearchResult) -> None:
        section.add(
            Text(f"{r.n_trials} trials: {r.n_complete} complete, {r.n_pruned} pruned, {r.n_failed} failed. "
                 f"Best: trial {r.best_trial}, {r.metric} {r.best_value:.4g} ({r.direction})."),
            facts({"study": r.study_name, "storage": r.storage,
                   "optim.lr bounds from the LR range test": list(r.lr_bounds) if r.lr_bounds else None}),
            Table(["parameter", "best value"], [[path, fmt(value)] for path, value in r.best_params.items()]),
        )  # fmt: skip
        trials = _trial_rows(r, config.tune.hpo.storage or r.storage, section, sources)
        if trials:
            params = list(r.best_params)
            section.add(Table(["trial", "state", r.metric, "best so far", *params, "seconds"], trials))
        sources.png(r.plot_uri, "hpo_history", "HPO: objective and best value so far over trials", section)
        if r.importances:
            ranked = sorted(r.importances.items(), key=lambda item: -item[1])
            section.add(Table(["parameter", "importance"], [[name, f"{value:.3f}"] for name, value in ranked]))
            png = sources.kept("hpo_importances.png", r.importances, lambda: importances_png(r.importances))
            section.add(Image("hpo_importances", png, "HPO: importances"))
        else:
            section.add(Text("No parameter importances: they need at least two complete trials and a varying metric."))

    return stage_section(summary, "hpo_search", "Hyperparameter search", HPOSearchResult, build)


def _trial_rows(r: HPOSearchResult, storage: str, section: Section, sources: Sources) -> list[list[str]]:
    """Every trial of the study with the best value so far, as the search that made `r` left them: read from
    its Optuna storage once per record, then kept (a later search of the same study makes another record)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        rows = sources.kept("hpo_trials.json", r.model_dump(mode="json"),
                            lambda: json.dumps(_read_trial_rows(r, storage)).encode())  # fmt: skip
    except (KeyError, OSError, SQLAlchemyError) as exc:
        sources.missing(section, "the trials", f"Optuna study {r.study_name} in {r.storage}", exc)
        return []
    return json.loads(rows or b"[]")


def _read_trial_rows(r: HPOSearchResult, storage: str) -> list[list[str]]:
    import optuna

    from trainflow.core.tuning.study import rdb_storage

    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError("no such database file")  # opening it would create an empty one
    rdb = rdb_storage(storage)
    try:
        trials = optuna.load_study(study_name=r.study_name, storage=rdb).get_trials()
    finally:
        rdb.engine.dispose()
    better = min if r.direction == "minimize" else max
    best: float | None = None
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
            best = trial.value if best is None else better(best, trial.value)
        seconds = trial.duration.total_seconds() if trial.duration else None
        rows.append([
            str(trial.number),
            trial.state.name,
            fmt(trial.value) if trial.value is not None else "",
            fmt(best) if best is not None else "",
            *(fmt(trial.params[p]) if p in trial.params else "" for p in r.best_params),
            f"{seconds:.1f}" if seconds is not None else "",
        ])  # fmt: skip
    return rows


def stage_section(
    summary: dict[str, Any], stage: str, title: str, record_type: type[R], build: Callable[[Section, R], None]
) -> Section:
    """`title`'s section: 'skipped: <reason>', or the stage record's content (noting a cached record)."""
    section = Section(title)
    if stage in summary["skipped"]:
        return section.add(Text(f"skipped: {summary['skipped'][stage]}"))
    info = summary["stages"].get(stage)
    if info is None:  # a flow that runs part of the pipeline (tune, train) ended before this stage
        return section.add(Text(f"not run: this flow run ended before {stage}."))
    if info["cached"]:
        section.add(Text(f"cached: the record of an earlier run was reused ({info['seconds']:.1f} s here)."))
    else:
        section.add(Text(f"ran in {info['seconds']:.1f} s."))
    record = record_type.model_validate({k: v for k, v in info.items() if k not in ("seconds", "cached")})
    build(section, record)
    return section
