"""The hpo_search stage: an Optuna study over `tune.hpo.space`, trials trained for a short budget,
bad ones pruned at an epoch's evaluation, `parallelism` worker processes at a time.

The study lives in RDB storage (SQLite in the store unless `tune.hpo.storage` names one) under a
name derived from the config, so a re-run continues it: trial numbers go on where they stopped.
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

from core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from core.errors import ConfigError, TrainingError
from core.hpo_trial import WorkerSpec, from_optuna, rdb_storage, run_worker
from core.lr_range_test import LRRangeTestResult, suggestion_or_error
from core.prepare_data import PrepareDataResult
from core.records import StageResult
from core.store import ArtifactStore
from core.train import check_metric
from core.tune_config import FloatParam, HPOConfig, ParamSpec

log = logging.getLogger(__name__)


class HPOSearchResult(StageResult):
    study_name: str
    storage: str  # without credentials
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_params: dict[str, Any]  # dotted config path -> value, merged into the training config
    best_value: float
    best_trial: int
    metric: str
    direction: str
    lr_bounds: tuple[float, float] | None  # optim.lr's range when taken from the LR range test
    importances: dict[str, float]  # importance of each parameter (empty below 2 complete trials)
    plot_uri: str  # optimisation history PNG

    def artifact_uris(self) -> list[str]:
        return [self.plot_uri]


def hpo_search(
    hpo: HPOConfig,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    seed: int,
    data: PrepareDataResult,
    lr_test: LRRangeTestResult | None,
    store: ArtifactStore,
    store_key: str,
    tracking: tuple[str, str, str] | None = None,
) -> HPOSearchResult:
    """Run (or continue) the study until it holds `hpo.n_trials` trials; return the best parameters.

    `tracking` is (tracking URI, experiment id, parent run id) for the trials' MLflow child runs.

    Raises:
        ConfigError: the metric is not one the data's task has, or given LR bounds clash with the
            derived ones (before any trial).
        TrainingError: optim.lr needs the range test's suggestion and there is none; or no trial
            completed (the message carries the first failure).
    """
    check_metric(hpo.metric, data.spec.task, "tune.hpo.metric")
    space, lr_bounds = resolve_space(hpo.space, lr_test)
    sections = {"data": data_cfg, "model": model_cfg, "optim": optim_cfg, "train": train_cfg}
    base: dict[str, Any] = {name: s.model_dump(mode="json") for name, s in sections.items()} | {"seed": seed}
    if base["optim"]["lr"] == "auto":  # trials need a number: the suggestion, or the searched range's low
        searched = space.get("optim.lr")
        no_suggestion = lr_test is None or lr_test.suggested_lr is None
        if isinstance(searched, FloatParam) and searched.low is not None and no_suggestion:
            base["optim"]["lr"] = searched.low
        else:
            base["optim"]["lr"] = suggestion_or_error(lr_test, "optim.lr: 'auto'", "set a value")
    storage = hpo.storage or f"sqlite:///{store.workdir('hpo') / 'optuna.db'}"
    name = hpo.study_name or _study_name(hpo, base, data)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log lines say what happens; Optuna's repeat them
    study = optuna.create_study(
        study_name=name, storage=rdb_storage(storage), direction=hpo.direction, load_if_exists=True
    )
    if hpo.storage is None:  # the study is this machine's alone: a RUNNING trial is one whose worker died
        _fail_interrupted(study)
    before = len(study.get_trials(deepcopy=False))
    workers = min(hpo.parallelism, max(1, hpo.n_trials - before))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    specs = [WorkerSpec(hpo, space, base, data, store.uri, storage, name, hpo.seed if hpo.seed is not None else seed,
                        worker, threads, tracking) for worker in range(workers)]  # fmt: skip
    log.info("hpo_search: study %s has %d trials; running to %d with %d worker(s)", name, before, hpo.n_trials, workers)
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
    best = min(complete, key=lambda t: t.value) if hpo.direction == "minimize" else max(complete, key=lambda t: t.value)
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
        metric=hpo.metric,
        direction=hpo.direction,
        lr_bounds=lr_bounds,
        importances=_importances(study),
        plot_uri=store.put_bytes(_history_png(study), f"{store_key}/optimization_history.png"),
    )


def resolve_space(
    space: dict[str, ParamSpec], lr_test: LRRangeTestResult | None
) -> tuple[dict[str, ParamSpec], tuple[float, float] | None]:
    """optim.lr without bounds becomes suggestion/10 .. suggestion*3, log-uniform."""
    spec = space.get("optim.lr")
    if not isinstance(spec, FloatParam) or (spec.low is not None and spec.high is not None):
        return dict(space), None
    suggestion = suggestion_or_error(lr_test, "tune.hpo.space.optim.lr:", "set a value")
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
