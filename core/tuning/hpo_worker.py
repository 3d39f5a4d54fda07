"""One HPO worker: ask the study for trials, train each for a short budget, tell the outcome.

Every worker (the stage's own process, or a spawned one per unit of `tune.hpo.parallelism`)
talks to the study through its RDB storage, which is Optuna's distributed mode: workers on other
machines join by running the same study name against the same storage URL. Each trial is an
MLflow child run of the hpo_search run, logged by explicit run id and ended with its true state.
A spawned worker (`serve`) warms up while the stage still opens the study, and exits without the
interpreter's teardown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

import optuna

from trainflow.core.config import CategoricalParam, Config, FloatParam, HPOConfig, ParamSpec, config_from_dict
from trainflow.core.data.prepared import load_splits
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.storage.tracking import MlflowMetricLogger, ParentRun, Tracker
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback, TrackingCallback, is_improvement, monitored_value
from trainflow.core.training.optim import import_optimizer_dependencies
from trainflow.core.training.state import StopReason
from trainflow.core.tuning.study import from_optuna, make_pruner, make_sampler, optuna_choices, rdb_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, picklable."""

    hpo: HPOConfig
    space: dict[str, ParamSpec]  # bounds resolved (optim.lr from the LR range test)
    base: dict[str, Any]  # model, optim, train, data and seed sections as plain data, optim.lr resolved
    data: PrepareDataResult
    store: ArtifactStore  # picklable: a spawned worker opens its own connection
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


Claim = Any  # multiprocessing.Value("b"): a spawned worker's state, changed under its lock
_WARMING, _WORKING, _STOPPED = 0, 1, 2  # WARMING becomes one of the others, once


def new_claim(context: BaseContext) -> Claim:
    return context.Value("b", _WARMING)


def stop_if_idle(claim: Claim) -> bool:
    """The stage's side: stop a worker that has not taken up work yet; True if it is stopped."""
    with claim.get_lock():
        if claim.value == _WARMING:
            claim.value = _STOPPED
        return claim.value == _STOPPED


def take_up_work(claim: Claim) -> bool:
    """The worker's side: start working unless the stage has stopped it meanwhile; True if it works."""
    with claim.get_lock():
        if claim.value == _WARMING:
            claim.value = _WORKING
        return claim.value == _WORKING


def has_worked(claim: Claim) -> bool:
    return claim.value == _WORKING


def serve(spec: WorkerSpec, release: Connection, claim: Claim) -> None:
    """A spawned worker's life: warm up while the stage opens the study, wait on `release` for its torch
    threads, then take up work unless the stage has stopped it meanwhile (`claim`), and run trials.

    Ends in `os._exit`: the interpreter's teardown (torch, MLflow, SQLAlchemy) took ~1.5 s here, all of it
    on the stage's path, which joins its workers. Trials, metrics and logs are stored and flushed by then.
    """
    code = 1
    try:
        tracker = _warm_up(spec)
        try:
            threads = release.recv()
        except EOFError:  # the stage ended without releasing it
            threads = None
        if threads is not None and take_up_work(claim):
            run_worker(replace(spec, torch_threads=threads), tracker=tracker)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm_up(spec: WorkerSpec) -> Tracker | None:
    """What a fresh process's first trial would pay (~1.5-2 s of CPU here), paid while the stage opens the study."""
    import_optimizer_dependencies()
    optuna.storages.RDBStorage("sqlite://")  # imports and sets up SQLAlchemy's ORM and alembic, in memory
    load_splits(spec.store.local_path(spec.data.uri), spec.data.spec)  # kept for every trial
    if spec.parent_run is None:
        return None
    tracker = Tracker(spec.parent_run.tracking_uri, spec.parent_run.experiment_id)
    tracker.client.get_experiment(spec.parent_run.experiment_id)  # opens MLflow's store (imports, schema check)
    return tracker


def run_worker(
    spec: WorkerSpec, storage: optuna.storages.RDBStorage | None = None, tracker: Tracker | None = None
) -> None:
    """Run trials until the study holds `hpo.n_trials` (or the timeout passes); `storage` and `tracker`
    are opened here unless given.

    With parallelism, workers that start a trial at the same moment can take the study up to
    parallelism - 1 trials past n_trials.
    """
    import torch

    threads = torch.get_num_threads()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if storage is None:
            storage = rdb_storage(spec.storage)
        existing = len(optuna.load_study(study_name=spec.study_name, storage=storage).get_trials(deepcopy=False))
        if existing >= spec.hpo.n_trials:
            return
        sampler = make_sampler(spec.hpo, spec.space, spec.seed, spec.worker, existing)
        pruner = make_pruner(spec.hpo)
        study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler, pruner=pruner)
        parent = spec.parent_run
        if tracker is None and parent is not None:
            tracker = Tracker(parent.tracking_uri, parent.experiment_id)
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
                                spec.store, [*callbacks, pruning])  # fmt: skip
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
    tags = {"trainflow.trial_state": state} | ({"trainflow.trial_note": note[:5000]} if note else {})
    logger.set_tags(tags)
    logger.flush()  # the last metrics and the tags, stored before the run ends
    tracker.end_run(run_id, status)
