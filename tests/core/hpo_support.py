"""What the hpo_search tests share: a one-thread torch, an MLflow database per module with a parent run per
test, the tiny search config, the stage called as the pipeline calls it, and checks of trials against runs.

Test modules take the fixtures with `from tests.core.hpo_support import *` (pytest collects fixtures from a
test module's namespace)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import torch
from mlflow.entities import Run

from tests.conftest import tiny_raw
from trainflow.core.config import Config, config_from_dict
from trainflow.core.hpo_search import hpo_search
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import HPOSearchResult, LRRangeTestResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.runs import RunLogger, Tracker
from trainflow.core.tuning.plan import search_spec

__all__ = ["FLOAT", "KEY", "assert_runs_match_trials", "lr_range_record", "one_torch_thread", "parent_run", "search",
           "search_config", "study_of", "tracker", "tracking", "trial_runs"]  # fmt: skip

KEY = "stages/hpo_search/test"
FLOAT = {"type": "float", "low": 0.0, "high": 0.5}


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, above all on a shared, busy machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    """One MLflow database for the module (creating its tables takes seconds); a parent run per test."""
    return Tracker.for_experiment(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}", "hpo")


@pytest.fixture
def tracking(tracker: Tracker, request: pytest.FixtureRequest) -> RunLogger:
    return parent_run(tracker, request.node.name)


def parent_run(tracker: Tracker, name: str) -> RunLogger:
    run = tracker.client.create_run(tracker.experiment_id, run_name=name)
    return RunLogger(tracker.client, run.info.run_id, tracker.experiment_id)


def search_config(hpo: dict[str, Any], lr_range_test: bool = False) -> Config:
    """tiny_raw with the search enabled; trials of 2 epochs, no pruning unless a test asks."""
    search = {"enabled": True, "sampler": "random", "pruner": "none", "max_epochs_per_trial": 2, "seed": 0} | hpo
    return config_from_dict(tiny_raw(tune={"lr_range_test": {"enabled": lr_range_test}, "hpo": search}))


def search(
    cfg: Config, store: LocalStore, tracking: RunLogger | None, lr_range: LRRangeTestResult | None = None
) -> HPOSearchResult:
    """The stage as the pipeline calls it: the search's training spec (core.tuning.plan), prepared data."""
    spec = search_spec(cfg, prepare_data(cfg.data, cfg.seed, store), lr_range)
    assert spec is not None, "the search is enabled"
    return hpo_search(cfg.tune.hpo, spec, lr_range, store, KEY, tracking)


def study_of(result: HPOSearchResult) -> optuna.Study:
    return optuna.load_study(study_name=result.study_name, storage=result.storage)


def trial_runs(tracker: Tracker, tracking: RunLogger) -> dict[str, Run]:
    """The parent run's children by run name (`trial-<n>`)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracking.run_id}'"
    )
    return {run.info.run_name: run for run in runs}


def lr_range_record(store: LocalStore, suggested_lr: float | None, reason: str) -> LRRangeTestResult:
    curve = store.put_bytes(json.dumps({"lr": [1e-4, 1e-2], "loss": [1.1, 0.6]}).encode(), "lr_range/lr_curve.json")
    plot = store.put_bytes(b"\x89PNG\r\n\x1a\n", "lr_range/lr_range_test.png")
    return LRRangeTestResult(suggested_lr=suggested_lr, rule="valley", reason=reason, num_steps_run=100,
                             diverged=False, suggestions={"valley": suggested_lr, "steepest": None, "min_div_10": None},
                             curve_uri=curve, plot_uri=plot)  # fmt: skip


_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def assert_runs_match_trials(study: optuna.Study, runs: dict[str, Run]) -> None:
    """One MLflow child run per trial, with the trial's state as tag and as run status."""
    assert sorted(runs) == sorted(f"trial-{t.number}" for t in study.trials)
    for trial in study.trials:
        run = runs[f"trial-{trial.number}"]
        assert run.data.tags["trainflow.trial_state"] == trial.state.name
        assert run.info.status == _STATUS[trial.state.name], trial.number
        assert run.data.params["trial"] == str(trial.number)
