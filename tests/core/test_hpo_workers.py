"""The hpo_search stage's machinery: spawned worker processes (warming up, released, stopped when idle),
the Optuna study's storage, every sampler and pruner, and the storage URL shown without its password."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch

import trainflow.core.hpo_search as hpo_search_module
from tests.core.hpo_support import *  # noqa: F403  fixtures: one_torch_thread, tracker, tracking
from tests.core.hpo_support import FLOAT, assert_runs_match_trials, search, search_config, study_of, trial_runs
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.runs import RunLogger, Tracker
from trainflow.core.tuning.hpo_worker import SearchJob, has_worked, new_claim, run_worker, stop_if_idle, take_up_work
from trainflow.core.tuning.study import rdb_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ parallel workers
@pytest.mark.slow
def test_parallel_workers_fill_the_study_with_mlflow_runs_for_every_trial(
    store: LocalStore, tracker: Tracker, tracking: RunLogger, monkeypatch: pytest.MonkeyPatch
) -> None:
    def after_worker_1s_first_trial(job: SearchJob, **kwargs: Any) -> None:
        """Worker 0 (here) would run every tiny trial before worker 1 has warmed up: it waits for worker 1's first."""
        deadline = time.monotonic() + 300
        while not optuna.load_study(study_name=job.study_name, storage=kwargs["storage"]).get_trials(deepcopy=False):
            assert time.monotonic() < deadline, "worker 1 started no trial"
            time.sleep(0.1)
        run_worker(job, **kwargs)

    monkeypatch.setattr(hpo_search_module, "run_worker", after_worker_1s_first_trial)
    cfg = search_config({"space": {"model.dropout": FLOAT}, "n_trials": 4, "parallelism": 2})
    result = search(cfg, store, tracking)  # worker 0 here, worker 1 in a spawned process

    study = study_of(result)
    # Each worker checks the count, then asks for a trial: two workers checking at once can add one
    # trial too many. What is guaranteed is at least n_trials and at most n_trials + parallelism - 1.
    assert 4 <= result.n_trials <= 5
    assert result.n_trials == result.n_complete == len(study.trials)
    assert [t.number for t in study.trials] == list(range(result.n_trials))
    assert_runs_match_trials(study, trial_runs(tracker, tracking))


def _idle_workers(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    """hpo_search's spawned workers become stand-ins that never take up work, as if still warming up."""
    workers: list[SimpleNamespace] = []

    def process(target: Any, args: tuple[Any, ...], name: str) -> SimpleNamespace:
        worker = SimpleNamespace(name=name, exitcode=None, terminated=False, start=lambda: None, join=lambda: None)

        def terminate() -> None:  # as a real process ends on SIGTERM: a negative exit code, which is no failure
            worker.terminated, worker.exitcode = True, -15

        worker.terminate = terminate
        workers.append(worker)
        return worker

    context = SimpleNamespace(Process=process, Pipe=multiprocessing.Pipe, Value=multiprocessing.Value)
    monkeypatch.setattr(hpo_search_module, "multiprocessing", SimpleNamespace(get_context=lambda method: context))
    return workers


def test_an_idle_spawned_worker_is_stopped_and_the_callers_torch_threads_are_left_alone(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = _idle_workers(monkeypatch)
    threads = max(1, (os.cpu_count() or 1) // 2) + 1  # not what a worker of two sets
    torch.set_num_threads(threads)
    cfg = search_config({"space": {"model.dropout": FLOAT}, "n_trials": 2, "parallelism": 2})
    assert search(cfg, store, None).n_trials == 2
    assert torch.get_num_threads() == threads
    assert workers[0].terminated, "worker 0 ran every trial; worker 1, still warming up, was stopped"

    def worker_0(job: SearchJob, **kwargs: Any) -> None:
        assert workers[1].terminated, "no trial is left: worker 1 is stopped before worker 0 starts"
        run_worker(job, **kwargs)

    monkeypatch.setattr(hpo_search_module, "run_worker", worker_0)
    assert search(cfg, store, None).n_trials == 2  # the same study, complete: continued, not extended


def test_the_stage_and_a_warming_worker_agree_on_who_decides() -> None:
    context = multiprocessing.get_context("spawn")
    stopped, working = new_claim(context), new_claim(context)
    assert stop_if_idle(stopped) and not take_up_work(stopped) and not has_worked(stopped)
    assert take_up_work(working) and not stop_if_idle(working) and has_worked(working)


def test_an_sqlite_study_commits_without_waiting_for_the_disk(tmp_path: Path) -> None:
    storage = rdb_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(storage=storage)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: no fsync per commit


# --------------------------------------------------------------------------- the study's parts
@pytest.mark.parametrize(("sampler", "pruner"), [("tpe", "hyperband"), ("gp", "median"), ("random", "none")])
def test_every_sampler_and_pruner_runs_a_study(sampler: str, pruner: str, store: LocalStore) -> None:
    space = {"model.dropout": FLOAT, "train.batch_size": {"type": "categorical", "choices": [16, 32]}}
    result = search(search_config({"space": space, "sampler": sampler, "pruner": pruner, "n_trials": 4}), store, None)
    assert result.n_trials == 4 and result.n_complete >= 1 and result.n_failed == 0
    assert set(result.best_params) == {"model.dropout", "train.batch_size"}
    assert 0.0 <= result.best_params["model.dropout"] <= 0.5 and result.best_params["train.batch_size"] in (16, 32)
