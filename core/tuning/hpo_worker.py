"""One HPO worker: ask the study for trials, train each for a short budget, tell the outcome.

Every worker (the stage's own process, or a spawned one per unit of `tune.hpo.parallelism`)
talks to the study through its RDB storage, which is Optuna's distributed mode: workers on other
machines join by running the same study name against the same storage URL. Each trial is an
MLflow child run of the hpo_search run, logged by explicit run id and ended with its true state.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import optuna

from core.config import CategoricalParam, Config, FloatParam, HPOConfig, ParamSpec, config_from_dict
from core.records import PrepareDataResult
from core.storage.store import open_store
from core.storage.tracking import MlflowMetricLogger, ParentRun, Tracker
from core.training.builder import build_trainer
from core.training.callbacks import Callback, TrackingCallback, is_improvement, monitored_value
from core.training.state import StopReason
from core.tuning.study import from_optuna, make_pruner, make_sampler, optuna_choices, rdb_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, picklable."""

    hpo: HPOConfig
    space: dict[str, ParamSpec]  # bounds resolved (optim.lr from the LR range test)
    base: dict[str, Any]  # model, optim, train, data and seed sections as plain data, optim.lr resolved
    data: PrepareDataResult
    store_uri: str
    storage: str
    study_name: str
    seed: int
    worker: int  # 0 in the stage's process
    torch_threads: int | None
    parent_run: ParentRun | None  # the hpo_search run: each trial is a child run of it


class OptunaPruning(Callback):
    """Reports the monitored metric after each evaluation; asks the loop to stop when Optuna prunes."""

    def __init__(self, trial: optuna.Trial, metric: str, direction: str):
        self.trial, self.metric = trial, metric
        self.mode = "min" if direction == "minimize" else "max"
        self.best: float | None = None
        self.reports = 0

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = monitored_value(metrics, self.metric, "tune.hpo.metric")
        if is_improvement(value, self.best, self.mode, 0.0):
            self.best = value
        self.reports += 1
        self.trial.report(value, step=self.reports)
        if self.trial.should_prune():
            trainer.request_stop(
                StopReason.PRUNED, f"pruned after {self.reports} evaluations ({self.metric}={value:.4g})"
            )


def run_worker(spec: WorkerSpec) -> None:
    """Run trials until the study holds `hpo.n_trials` (or the timeout passes).

    With parallelism, workers that start a trial at the same moment can take the study up to
    parallelism - 1 trials past n_trials.
    """
    import torch

    threads = torch.get_num_threads()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = rdb_storage(spec.storage)
        existing = len(optuna.load_study(study_name=spec.study_name, storage=storage).get_trials(deepcopy=False))
        if existing >= spec.hpo.n_trials:
            return
        sampler = make_sampler(spec.hpo, spec.space, spec.seed, spec.worker, existing)
        pruner = make_pruner(spec.hpo)
        study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner)
        parent = spec.parent_run
        tracker = Tracker(parent.tracking_uri, parent.experiment_id) if parent else None
        study.optimize(
            lambda trial: _objective(trial, spec, tracker),
            timeout=spec.hpo.timeout_s,
            catch=(Exception,),  # a failing trial (NaN, OOM, a bad combination) is recorded; the study goes on
            callbacks=[optuna.study.MaxTrialsCallback(spec.hpo.n_trials, states=None)],
        )
    finally:
        torch.set_num_threads(threads)  # worker 0 runs in the stage's process: leave it as it was


def _objective(trial: optuna.Trial, spec: WorkerSpec, tracker: Tracker | None) -> float:
    """Train one trial; its MLflow run ends with the trial's true state (FINISHED, KILLED, FAILED)."""
    params = {path: _suggest(trial, path, p) for path, p in spec.space.items()}
    run_id = None
    if tracker is not None and spec.parent_run is not None:
        run_id = tracker.start_stage_run(spec.parent_run.run_id, f"trial-{trial.number}")
    logger = tracker.logger(run_id) if tracker and run_id else None
    if logger:
        logger.log_params(params | {"trial": trial.number})
    pruning = OptunaPruning(trial, spec.hpo.metric, spec.hpo.direction)
    try:
        config = trial_config(spec, params)
        callbacks = [TrackingCallback(logger)] if logger else []
        trainer = build_trainer(config.model, config.optim, config.train, config.data.loader, spec.seed, spec.data,
                                open_store(spec.store_uri), [*callbacks, pruning])  # fmt: skip
        fit = trainer.fit()
        if pruning.best is None or not math.isfinite(pruning.best):
            raise ValueError(f"{spec.hpo.metric} was {pruning.best} (diverged)")
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
        _end(tracker, logger, run_id, "FAILED", "FAIL", str(exc))
        raise
    if fit.stop_reason is StopReason.PRUNED:
        _end(tracker, logger, run_id, "KILLED", "PRUNED", fit.stop_message)
        raise optuna.TrialPruned(fit.stop_message)
    _end(tracker, logger, run_id, "FINISHED", "COMPLETE", None)
    return pruning.best


def trial_config(spec: WorkerSpec, params: dict[str, Any]) -> Config:
    """The base sections with the trial's values, validated, trimmed to the trial's budget."""
    hpo = spec.hpo
    budget = {"max_epochs": hpo.max_epochs_per_trial, "max_steps": hpo.max_steps_per_trial, "progress_bar": False,
              "early_stopping": {"enabled": False}}  # fmt: skip
    overrides = [f"{path}={json.dumps(value)}" for path, value in params.items()]
    overrides += [f"train.{key}={json.dumps(value)}" for key, value in budget.items()]
    return config_from_dict(spec.base, overrides, source="trial")


def _suggest(trial: optuna.Trial, path: str, spec: ParamSpec) -> Any:
    if isinstance(spec, FloatParam):
        assert spec.low is not None and spec.high is not None, "bounds are resolved before trials start"
        return trial.suggest_float(path, spec.low, spec.high, log=spec.log, step=spec.step)
    if isinstance(spec, CategoricalParam):
        return from_optuna(trial.suggest_categorical(path, optuna_choices(spec)))
    return trial.suggest_int(path, spec.low, spec.high, step=spec.step, log=spec.log)


def _end(
    tracker: Tracker | None,
    logger: MlflowMetricLogger | None,
    run_id: str | None,
    status: str,
    state: str,
    note: str | None,
) -> None:
    if tracker is None or logger is None or run_id is None:
        return
    logger.flush()
    tags = {"trainflow.trial_state": state} | ({"trainflow.trial_note": note[:5000]} if note else {})
    logger.set_tags(tags)
    tracker.end_run(run_id, status)
