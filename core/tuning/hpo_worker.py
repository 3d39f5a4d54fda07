"""One HPO worker: ask the study for trials, train each for a short budget, tell the outcome.

Every worker (the stage's own process, or a spawned one per unit of `tune.hpo.parallelism`)
talks to the study through its RDB storage, which is Optuna's distributed mode: workers on other
machines join by running the same study name against the same storage URL. Each trial is an
MLflow child run of the hpo_search run, logged by explicit run id and ended with its true state.
A started worker (`serve`) is forked from a server that has done its imports (`start_worker_server`), warms
up while the stage still opens the study, and exits without the interpreter's teardown.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import socket
import sys
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

import optuna

from trainflow.core.config import CategoricalParam, FloatParam, HPOConfig, ParamSpec
from trainflow.core.data.prepared import load_splits
from trainflow.core.records import diagnosis_tag
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.tracking.runs import RunLogger
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback, TrackingCallback, is_improvement, monitored_value
from trainflow.core.training.diagnostics import search_doctor
from trainflow.core.training.optim import import_optimizer_dependencies
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import StopReason
from trainflow.core.tuning.study import from_optuna, make_pruner, make_sampler, optuna_choices, quietly, rdb_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchJob:
    """Everything a worker process needs, picklable."""

    hpo: HPOConfig
    space: dict[str, ParamSpec]  # bounds resolved (optim.lr from the LR range test)
    spec: TrainingSpec  # what every trial trains, with its drawn values (core.tuning.plan.search_spec)
    store: ArtifactStore  # picklable: a spawned worker opens its own connection
    storage: str
    study_name: str
    seed: int
    worker: int  # 0 in the stage's process
    torch_threads: int | None
    parent_run: RunLogger | None  # the hpo_search run: each trial is a child run of it


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


# Imported once, by the server workers fork from (~4 s of CPU here): torch, the trainer and Optuna (this module), the
# first optimizer's torch._dynamo, the study's ORM, MLflow's client; and multiprocessing's default, the main module
# (Python 3.11's forkserver never gets its path: each worker imports it, as a spawned one does).
WORKER_MODULES = ("__main__", "trainflow.core.tuning.hpo_worker", "torch._dynamo", "optuna.storages._rdb.models",
                  "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store")  # fmt: skip


def start_worker_server() -> str:
    """Start the server workers fork from unless it runs; returns the start method for `get_context`. One
    forkserver per stage process, kept until it ends, so later searches fork warm workers: a fresh interpreter
    (none of this process's MLflow clients, connections or torch threads) that imports `WORKER_MODULES` in the
    background; a worker started before that ends waits for it. Without forkserver (Windows): "spawn"."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(list(WORKER_MODULES))  # read when it starts
    forkserver.ensure_running()  # a no-op while it runs; restarts one that died
    return "forkserver"


def worker_args(job: SearchJob, release: Connection, claim: Claim) -> tuple[Any, ...]:
    """`serve`'s arguments: the stage's environment, and the job pickled, to be read once that is applied (the
    server's is the one it started with; a RunLogger resolves its URI's `${VAR}`s when unpickled)."""
    return dict(os.environ), pickle.dumps(job), release, claim


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


def serve(environment: dict[str, str], pickled_job: bytes, release: Connection, claim: Claim) -> None:
    """A started worker's life (arguments from `worker_args`): take the stage's environment, warm up while the
    stage opens the study, wait on `release` for its torch threads, then take up work unless the stage has
    stopped it meanwhile (`claim`), and run trials.

    Ends in `os._exit`: the interpreter's teardown (torch, MLflow, SQLAlchemy) took ~1.5 s here, all of it
    on the stage's path, which joins its workers. Trials, metrics and logs are stored and flushed by then.
    """
    code = 1
    try:
        os.environ.clear()
        os.environ.update(environment)
        job: SearchJob = pickle.loads(pickled_job)
        _warm_up(job)
        try:
            threads = release.recv()
        except EOFError:  # the stage ended without releasing it
            threads = None
        if threads is not None and take_up_work(claim):
            run_worker(replace(job, torch_threads=threads))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm_up(job: SearchJob) -> None:
    """What a worker's first trial would pay beyond the server's imports, paid while the stage opens the study;
    the imports too where there is no server (spawned: ~1.5-2 s of CPU here, on top of the module imports)."""
    import_optimizer_dependencies()
    optuna.storages.RDBStorage("sqlite://")  # imports and sets up SQLAlchemy's ORM and alembic, in memory
    load_splits(job.store, job.spec.data)  # kept for every trial
    if job.parent_run is not None:  # opens MLflow's store (imports, schema check)
        job.parent_run.client.get_experiment(job.parent_run.experiment_id)


def requeued(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """Failed trials whose parameters were re-queued after their worker died -> the trial that re-ran them
    (`RetryHeartbeatStaleTrialCallback` records, in each copy, the trials it replaced)."""
    return {number: t.number for t in trials for number in t.system_attrs.get("retry_history", ())}


def counted_trials(trials: list[optuna.trial.FrozenTrial]) -> int:
    """The trials the budget counts: all of them, except a failed one that was re-queued (its copy counts)."""
    retried, failed = requeued(trials), optuna.trial.TrialState.FAIL
    return sum(1 for t in trials if not (t.state == failed and t.number in retried))


class StopAtBudget:
    """Optuna callback: stop this worker once the study's counted trials (`counted_trials`) reach `n_trials`.

    Each worker checks after its own trial, so workers that start a trial at the same moment can take the study
    past the budget: the study ends with between n_trials and n_trials + workers - 1 counted trials, workers
    being every process running trials at once, on any machine."""

    def __init__(self, n_trials: int):
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if counted_trials(study.get_trials(deepcopy=False)) >= self.n_trials:
            study.stop()


def run_worker(job: SearchJob, storage: optuna.storages.RDBStorage | None = None) -> None:
    """Run trials until the study's counted trials reach `hpo.n_trials` (or the timeout passes); `storage` is
    opened here unless given. See `StopAtBudget` for what the study guarantees."""
    import torch

    threads = torch.get_num_threads()
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if storage is None:
            storage = rdb_storage(job.storage, job.hpo)
        existing = counted_trials(optuna.load_study(study_name=job.study_name, storage=storage).get_trials())
        if existing >= job.hpo.n_trials:
            return
        sampler = make_sampler(job.hpo, job.space, job.seed, job.worker, existing)
        study = optuna.load_study(study_name=job.study_name, storage=storage, sampler=sampler,
                                  pruner=make_pruner(job.hpo))  # fmt: skip
        study.optimize(
            lambda trial: _objective(trial, job),
            timeout=job.hpo.timeout_s,
            catch=(Exception,),  # a failing trial (NaN, OOM, a bad combination) is recorded; the study goes on
            callbacks=[StopAtBudget(job.hpo.n_trials)],
        )
    finally:
        torch.set_num_threads(threads)  # worker 0 runs in the stage's process: leave it as it was


def finish_study(job: SearchJob, storage: optuna.storages.RDBStorage, poll_s: float = 1.0) -> None:
    """Node 0 on a shared study, after its own workers stop: until no trial is RUNNING or WAITING, fail the stale
    ones (a worker elsewhere died: no heartbeat for `hpo.grace_period_s`; the retry callback re-queues them) and
    run the re-queued ones itself, so a study never waits on a dead machine. Live workers' trials are waited for."""
    running, waiting = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
    study = optuna.load_study(study_name=job.study_name, storage=storage, sampler=make_sampler(job.hpo, job.space,
                              job.seed, job.worker), pruner=make_pruner(job.hpo))  # fmt: skip
    noted: set[int] = set()
    while True:
        quietly(optuna.storages.fail_stale_trials, study)
        open_trials = study.get_trials(deepcopy=False, states=(running, waiting))
        if not open_trials:
            _end_dead_workers_runs(study, job)
            return
        if any(t.state == waiting for t in open_trials):
            log.info("hpo_search: running a re-queued trial of a worker that stopped answering")
            study.optimize(lambda trial: _objective(trial, job), n_trials=1, catch=(Exception,))
            continue
        for trial in open_trials:
            if trial.number not in noted:
                log.info("hpo_search: waiting for trial %d, running elsewhere", trial.number)
                noted.add(trial.number)
        time.sleep(poll_s)


def _objective(trial: optuna.Trial, job: SearchJob) -> float:
    """Train one trial; its MLflow run (a child of the stage's) ends with the trial's true state: FINISHED,
    KILLED (pruned) or FAILED."""
    params = {path: _suggest(trial, path, p) for path, p in job.space.items()}
    trial.set_user_attr("worker", worker_name())
    with _trial_run(job, trial.number, params) as run:
        pruning = OptunaPruning(trial, job.hpo.metric, job.hpo.direction)
        try:
            callbacks = [TrackingCallback(run)] if run else []
            spec = trial_spec(job, params)
            doctor = search_doctor(spec)  # train.diagnostics.in_search
            fit = build_trainer(spec, job.store, [*callbacks, pruning, *doctor]).fit()
            if run and doctor:
                run.set_tags({"trainflow.diagnosis": diagnosis_tag(doctor[0].findings)})
            if pruning.best is None or not math.isfinite(pruning.best):
                raise ValueError(f"{job.hpo.metric} was {pruning.best} (diverged)")
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            _note(run, "FAIL", str(exc))
            raise
        if fit.stop_reason is StopReason.PRUNED:
            _note(run, "PRUNED", fit.stop_message)
            if run:
                run.end_status = "KILLED"
        else:
            _note(run, "COMPLETE", None)
    if fit.stop_reason is StopReason.PRUNED:
        raise optuna.TrialPruned(fit.stop_message)
    return pruning.best


def _end_dead_workers_runs(study: optuna.Study, job: SearchJob) -> None:
    """A trial failed for its dead worker left its MLflow run RUNNING (nobody was there to end it): end it FAILED,
    naming the trial that re-ran its parameters."""
    if job.parent_run is None:
        return
    rerun_as = requeued(study.get_trials(deepcopy=False))
    if not rerun_as:
        return
    client, parent = job.parent_run.client, job.parent_run
    running = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}' and "
                                 "attributes.status = 'RUNNING'")  # fmt: skip
    for run in running:
        number = run.info.run_name.removeprefix("trial-")
        if number.isdigit() and int(number) in rerun_as:
            orphan = RunLogger(client, run.info.run_id, parent.experiment_id)
            _note(orphan, "FAIL", f"its worker stopped answering; failed and re-run as trial {rerun_as[int(number)]}")
            orphan.close()
            client.set_terminated(run.info.run_id, status="FAILED")


def worker_name() -> str:
    """Which machine and process ran a trial (a trial's `worker` user attribute)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def trial_spec(job: SearchJob, params: dict[str, Any]) -> TrainingSpec:
    """The search's training with the trial's values, trimmed to the trial's budget."""
    hpo = job.hpo
    spec = job.spec.with_values(params)
    budget = {"max_epochs": hpo.max_epochs_per_trial, "max_steps": hpo.max_steps_per_trial, "progress_bar": False,
              "early_stopping": spec.train.early_stopping.model_copy(update={"enabled": False})}  # fmt: skip
    return spec.model_copy(update={"train": spec.train.model_copy(update=budget)})


def _trial_run(job: SearchJob, number: int, params: dict[str, Any]) -> AbstractContextManager[RunLogger | None]:
    if job.parent_run is None:
        return nullcontext()
    return job.parent_run.child(f"trial-{number}", params | {"trial": number})


def _note(run: RunLogger | None, state: str, note: str | None) -> None:
    if run is not None:
        run.set_tags({"trainflow.trial_state": state} | ({"trainflow.trial_note": note[:5000]} if note else {}))


def _suggest(trial: optuna.Trial, path: str, spec: ParamSpec) -> Any:
    if isinstance(spec, FloatParam):
        assert spec.low is not None and spec.high is not None, "bounds are resolved before trials start"
        return trial.suggest_float(path, spec.low, spec.high, log=spec.log, step=spec.step)
    if isinstance(spec, CategoricalParam):
        return from_optuna(trial.suggest_categorical(path, optuna_choices(spec)))
    return trial.suggest_int(path, spec.low, spec.high, step=spec.step, log=spec.log)
