"""The hpo_search stage: an Optuna study over `tune.hpo.space`, trials trained for a short budget,
unpromising ones pruned at an epoch's evaluation (Hyperband by default), `parallelism` worker
processes at a time.

The study lives in RDB storage (SQLite in the store unless `tune.hpo.storage` names one) under a
name derived from the config, so a re-run continues it: trial numbers go on where they stopped.
Builds on core/tuning/: hpo_worker.py (a worker's trial loop: config, Trainer, pruning callback,
MLflow child run per trial) and study.py (sampler, pruner, storage).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
from typing import Any

import optuna

from core.config import DataConfig, FloatParam, HPOConfig, ModelConfig, OptimConfig, ParamSpec, TrainConfig
from core.data.spec import check_metric
from core.errors import ConfigError, TrainingError
from core.records import HPOSearchResult, LRRangeTestResult, PrepareDataResult
from core.storage.store import ArtifactStore
from core.storage.tracking import ParentRun
from core.tuning.apply import lr_suggestion
from core.tuning.hpo_worker import WorkerSpec, run_worker
from core.tuning.study import from_optuna, rdb_storage

log = logging.getLogger(__name__)


def hpo_search(
    cfg: HPOConfig,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data: PrepareDataResult,
    lr_range: LRRangeTestResult | None,
    store: ArtifactStore,
    store_key: str,
    parent_run: ParentRun | None = None,
) -> HPOSearchResult:
    """Run (or continue) the study until it holds `cfg.n_trials` trials; return the best parameters.

    With `parent_run` (the stage's MLflow run) every trial is logged as a child run of it.

    Raises:
        ConfigError: the metric is not one the data's task has, or given LR bounds clash with the
            derived ones (before any trial).
        TrainingError: optim.lr needs the range test's suggestion and there is none; or no trial
            completed (the message carries the first failure).
    """
    check_metric(cfg.metric, data.spec.task, "tune.hpo.metric")
    space, lr_bounds = resolve_space(cfg.space, lr_range)
    sections = {"data": data_cfg, "model": model_cfg, "optim": optim_cfg, "train": train_cfg}
    base: dict[str, Any] = {name: s.model_dump(mode="json") for name, s in sections.items()} | {"seed": seed}
    if base["optim"]["lr"] == "auto":  # trials need a number: the suggestion, or the searched range's low
        searched = space.get("optim.lr")
        no_suggestion = lr_range is None or lr_range.suggested_lr is None
        if isinstance(searched, FloatParam) and searched.low is not None and no_suggestion:
            base["optim"]["lr"] = searched.low
        else:
            base["optim"]["lr"] = lr_suggestion(lr_range, "optim.lr: 'auto'", "set a value")
    storage = cfg.storage or f"sqlite:///{store.workdir('hpo') / 'optuna.db'}"
    name = cfg.study_name or _study_name(cfg, base, data)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log lines say what happens; Optuna's repeat them
    study = optuna.create_study(
        study_name=name, storage=rdb_storage(storage), direction=cfg.direction, load_if_exists=True
    )
    if cfg.storage is None:  # the study is this machine's alone: a RUNNING trial is one whose worker died
        _fail_interrupted(study)
    before = len(study.get_trials(deepcopy=False))
    workers = min(cfg.parallelism, max(1, cfg.n_trials - before))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    specs = [WorkerSpec(cfg, space, base, data, store.uri, storage, name, cfg.seed if cfg.seed is not None else seed,
                        worker, threads, parent_run) for worker in range(workers)]  # fmt: skip
    log.info("hpo_search: study %s has %d trials; running to %d with %d worker(s)", name, before, cfg.n_trials, workers)
    _run_workers(specs)

    study = optuna.load_study(study_name=name, storage=rdb_storage(storage))
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
        raise TrainingError(
            f"hpo_search: none of {len(trials)} trials completed" + (f"; first error: {errors[0]}" if errors else "")
        )
    best = min(complete, key=lambda t: t.value) if cfg.direction == "minimize" else max(complete, key=lambda t: t.value)
    params = {path: from_optuna(value) for path, value in best.params.items()}
    return HPOSearchResult(
        study_name=name,
        storage=_without_password(storage),
        n_trials=len(trials),
        n_complete=len(complete),
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
        best_params=params,
        best_value=float(best.value),
        best_trial=best.number,
        metric=cfg.metric,
        direction=cfg.direction,
        lr_bounds=lr_bounds,
        importances=_importances(study),
        plot_uri=store.put_bytes(_history_png(study), f"{store_key}/optimization_history.png"),
    )


def resolve_space(
    space: dict[str, ParamSpec], lr_range: LRRangeTestResult | None
) -> tuple[dict[str, ParamSpec], tuple[float, float] | None]:
    """optim.lr without bounds becomes suggestion/10 .. suggestion*3, log-uniform."""
    spec = space.get("optim.lr")
    if not isinstance(spec, FloatParam) or (spec.low is not None and spec.high is not None):
        return dict(space), None
    suggestion = lr_suggestion(lr_range, "tune.hpo.space.optim.lr:", "set a value")
    low, high = spec.low or suggestion / 10, spec.high or suggestion * 3
    if low >= high:
        raise ConfigError(
            f"tune.hpo.space.optim.lr: low={low:g} is not below high={high:g}, the bound derived from the LR range "
            f"test's suggestion {suggestion:.3g}; give both bounds or neither"
        )
    return space | {"optim.lr": FloatParam(type="float", low=low, high=high, log=True)}, (low, high)


def _fail_interrupted(study: optuna.Study) -> None:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        log.warning("hpo_search: trial %d was left running by an interrupted run; marked failed", trial.number)


def _run_workers(specs: list[WorkerSpec]) -> None:
    """Worker 0 runs here; the others in spawned processes (their own interpreter and torch threads)."""
    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=run_worker, args=(spec,), name=f"hpo-worker-{spec.worker}") for spec in specs[1:]]
    for process in others:
        process.start()
    try:
        run_worker(specs[0])
    finally:
        for process in others:
            process.join()
    failed = [p.name for p in others if p.exitcode != 0]
    if failed:
        raise TrainingError(f"hpo_search: worker processes {', '.join(failed)} exited abnormally")


def _study_name(hpo: HPOConfig, base: dict[str, Any], data: PrepareDataResult) -> str:
    """Same config, same study: a re-run continues it. Budget and parallelism are not part of it."""
    identity = {"hpo": hpo.model_dump(mode="json", include={"space", "sampler", "pruner", "max_epochs_per_trial",
                                                            "max_steps_per_trial", "metric", "direction", "seed"}),
                "base": base, "data": data.fingerprint}  # fmt: skip
    return "trainflow-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's default evaluator (PED-ANOVA in Optuna 5); needs at least two complete trials."""
    if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # fewer than two complete trials, or a constant objective
        return {}


def _history_png(study: optuna.Study) -> bytes:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_optimization_history(study)
    buffer = io.BytesIO()
    axes.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(axes.figure)
    return buffer.getvalue()


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
