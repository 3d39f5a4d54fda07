"""The hpo_search stage on wine and a small MLP: the search space checked before any trial, pruned
and failed trials recorded in Optuna and MLflow alike, a study continued across runs, parallel
worker processes, LR bounds from the range test, and the result record.

Trials log to MLflow on a temporary SQLite file, as child runs of a real parent run (the branch the
pipeline takes); the Optuna study lives in the store's default SQLite file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from mlflow.entities import Run

import core.hpo_search as hpo_search_module
from core.config import CategoricalParam, Config, FloatParam, config_from_dict
from core.errors import ConfigError, TrainingError
from core.hpo_search import hpo_search, resolve_space
from core.prepare_data import prepare_data
from core.records import HPOSearchResult, LRRangeTestResult
from core.storage.store import LocalStore
from core.storage.tracking import ParentRun, Tracker
from core.tuning.apply import apply_tuning, tuning_view
from core.tuning.hpo_worker import WorkerSpec, has_worked, new_claim, run_worker, stop_if_idle, take_up_work
from core.tuning.study import rdb_storage
from tests.conftest import tiny_raw

KEY = "stages/hpo_search/test"


@pytest.fixture(autouse=True)
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
def tracking(tracker: Tracker, request: pytest.FixtureRequest) -> ParentRun:
    return _parent_run(tracker, request.node.name)


def _parent_run(tracker: Tracker, name: str) -> ParentRun:
    run = tracker.client.create_run(tracker.experiment_id, run_name=name)
    return ParentRun(tracker.uri, tracker.experiment_id, run.info.run_id)


def _config(hpo: dict[str, Any], lr_range_test: bool = False) -> Config:
    """tiny_raw with the search enabled; trials of 2 epochs, no pruning unless a test asks."""
    search = {"enabled": True, "sampler": "random", "pruner": "none", "max_epochs_per_trial": 2, "seed": 0} | hpo
    return config_from_dict(tiny_raw(tune={"lr_range_test": {"enabled": lr_range_test}, "hpo": search}))


def _search(
    cfg: Config, store: LocalStore, tracking: ParentRun | None, lr_range: LRRangeTestResult | None = None
) -> HPOSearchResult:
    """The stage as the pipeline calls it: the tuning view of the train section, prepared data."""
    data = prepare_data(cfg.data, cfg.seed, store)
    return hpo_search(cfg.tune.hpo, cfg.data, cfg.model, cfg.optim, tuning_view(cfg.train), cfg.seed, data, lr_range,
                      store, KEY, tracking)  # fmt: skip


def _study(result: HPOSearchResult) -> optuna.Study:
    return optuna.load_study(study_name=result.study_name, storage=result.storage)


def _trial_runs(tracker: Tracker, tracking: ParentRun) -> dict[str, Run]:
    """The parent run's children by run name (`trial-<n>`)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracking.run_id}'"
    )
    return {run.info.run_name: run for run in runs}


def _lr_range(store: LocalStore, suggested_lr: float | None, reason: str) -> LRRangeTestResult:
    curve = store.put_bytes(json.dumps({"lr": [1e-4, 1e-2], "loss": [1.1, 0.6]}).encode(), "lr_range/lr_curve.json")
    plot = store.put_bytes(b"\x89PNG\r\n\x1a\n", "lr_range/lr_range_test.png")
    return LRRangeTestResult(suggested_lr=suggested_lr, rule="valley", reason=reason, num_steps_run=100,
                             diverged=False, suggestions={"valley": suggested_lr, "steepest": None, "min_div_10": None},
                             curve_uri=curve, plot_uri=plot)  # fmt: skip


_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _assert_runs_match_trials(study: optuna.Study, runs: dict[str, Run]) -> None:
    """One MLflow child run per trial, with the trial's state as tag and as run status."""
    assert sorted(runs) == sorted(f"trial-{t.number}" for t in study.trials)
    for trial in study.trials:
        run = runs[f"trial-{trial.number}"]
        assert run.data.tags["trainflow.trial_state"] == trial.state.name
        assert run.info.status == _STATUS[trial.state.name], trial.number
        assert run.data.params["trial"] == str(trial.number)


# ----------------------------------------------------------------- checks before any trial
_FLOAT = {"type": "float", "low": 0.0, "high": 0.5}


@pytest.mark.parametrize(
    ("hpo", "lr_range", "error", "match"),
    [
        ({"metric": "val/f1"}, None, ConfigError,
         r"tune\.hpo\.metric: 'val/f1' is not an evaluation metric of classification; "
         r"available: val/loss, val/accuracy"),
        ({"space": {"optim.lr": {"type": "float", "log": True}}}, (None, "the loss never fell"), TrainingError,
         r"tune\.hpo\.space\.optim\.lr: needs the LR range test's suggestion, but there is none "
         r"\(the loss never fell\)"),
        ({"space": {"optim.lr": {"type": "float", "log": True}}}, None, TrainingError,
         r"tune\.hpo\.space\.optim\.lr: .*\(the LR range test did not run\); set a value"),
    ],
    ids=["unknown-metric", "no-suggestion", "no-range-test"],
)  # fmt: skip
def test_the_stage_refuses_before_any_trial(
    hpo: dict[str, Any],
    lr_range: tuple[float | None, str] | None,
    error: type[Exception],
    match: str,
    store: LocalStore,
    tracker: Tracker,
    tracking: ParentRun,
) -> None:
    cfg = _config({"space": {"model.dropout": _FLOAT}} | hpo, lr_range_test=True)
    with pytest.raises(error, match=match):
        _search(cfg, store, tracking, _lr_range(store, *lr_range) if lr_range else None)
    assert not (store.root / "hpo").exists(), "no Optuna study was created"
    assert not _trial_runs(tracker, tracking)


# ------------------------------------------------------------------------------- pruning
def test_a_pruned_trial_is_a_killed_mlflow_run_with_its_epochs_logged(
    store: LocalStore, tracker: Tracker, tracking: ParentRun
) -> None:
    # Random sampler, seed 5 draws lr 1e-2, 1e-2, 1e-2, 1e-7, 1e-7: the median pruner (3 startup trials)
    # then holds three identical good curves, and the hopeless 1e-7 trials fall above their median.
    space = {"optim.lr": {"type": "categorical", "choices": [1e-7, 1e-2]}}
    median = {"pruner": "median", "pruner_startup_trials": 3, "pruner_warmup_evals": 1}
    cfg = _config({"space": space, "seed": 5, "n_trials": 5} | median)
    result = _search(cfg, store, tracking)

    study = _study(result)
    assert [(t.params["optim.lr"], t.state.name) for t in study.trials] == [
        (1e-2, "COMPLETE"), (1e-2, "COMPLETE"), (1e-2, "COMPLETE"), (1e-7, "PRUNED"), (1e-7, "PRUNED")
    ]  # fmt: skip
    assert (result.n_trials, result.n_complete, result.n_pruned, result.n_failed) == (5, 3, 2, 0)
    runs = _trial_runs(tracker, tracking)
    _assert_runs_match_trials(study, runs)
    assert result.n_pruned == sum(run.info.status == "KILLED" for run in runs.values())
    for trial in study.trials:
        run = runs[f"trial-{trial.number}"]
        assert run.data.params["optim.lr"] == str(trial.params["optim.lr"])
        history = tracker.client.get_metric_history(run.info.run_id, "val/loss")
        if trial.state.name == "COMPLETE":
            assert len(history) == 2, "one val/loss per epoch"
            assert trial.value == pytest.approx(min(m.value for m in history)), "the best epoch is the trial's value"
        else:
            assert len(history) == 1, "pruned at the first evaluation"
            assert run.data.tags["trainflow.trial_note"].startswith("pruned after 1 evaluations (val/loss=")
    assert result.best_params == {"optim.lr": 1e-2}


# -------------------------------------------------------------------------------- failures
def test_a_failing_trial_is_recorded_and_the_study_goes_on(
    store: LocalStore, tracker: Tracker, tracking: ParentRun
) -> None:
    # Seed 0 draws fp16, fp32, fp16: the first trial already fails (fp16 autocast needs CUDA).
    cfg = _config({"space": {"train.precision": {"type": "categorical", "choices": ["fp32", "fp16"]}}, "n_trials": 3})
    result = _search(cfg, store, tracking)

    study = _study(result)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL"]
    assert (result.n_trials, result.n_complete, result.n_pruned, result.n_failed) == (3, 1, 0, 2)
    assert result.best_trial == 1
    assert result.best_params == {"train.precision": "fp32"}
    runs = _trial_runs(tracker, tracking)
    _assert_runs_match_trials(study, runs)
    message = "train.precision: 'fp16' needs a CUDA device, this run uses cpu; use bf16"
    for trial in (study.trials[0], study.trials[2]):
        assert trial.user_attrs["error"] == f"ConfigError: {message}"
        assert runs[f"trial-{trial.number}"].data.tags["trainflow.trial_note"] == message


def test_when_every_trial_fails_the_first_error_is_raised(
    store: LocalStore, tracker: Tracker, tracking: ParentRun
) -> None:
    cfg = _config({"space": {"train.precision": {"type": "categorical", "choices": ["fp16"]}}, "n_trials": 2})
    with pytest.raises(
        TrainingError,
        match=r"hpo_search: none of 2 trials completed; first error: ConfigError: train\.precision: 'fp16' needs",
    ):
        _search(cfg, store, tracking)
    assert sorted((name, run.info.status) for name, run in _trial_runs(tracker, tracking).items()) == [
        ("trial-0", "FAILED"), ("trial-1", "FAILED")
    ]  # fmt: skip


# ----------------------------------------------------------------------------- continuing
def test_a_rerun_continues_the_study_and_a_changed_space_starts_a_new_one(
    store: LocalStore, tracker: Tracker, tracking: ParentRun
) -> None:
    space = {"model.dropout": _FLOAT}
    first = _search(_config({"space": space, "n_trials": 3}), store, tracking)
    assert first.n_trials == 3

    again = _parent_run(tracker, "rerun")
    second = _search(_config({"space": space, "n_trials": 5}), store, again)
    assert second.study_name == first.study_name
    assert second.storage == first.storage == f"sqlite:///{store.root / 'hpo' / 'optuna.db'}"
    assert (second.n_trials, second.n_complete) == (5, 5)
    assert [t.number for t in _study(second).trials] == [0, 1, 2, 3, 4]
    assert sorted(_trial_runs(tracker, tracking)) == ["trial-0", "trial-1", "trial-2"]
    assert sorted(_trial_runs(tracker, again)) == ["trial-3", "trial-4"], "only the missing trials ran"

    other = _search(_config({"space": {"model.dropout": {**_FLOAT, "high": 0.4}}, "n_trials": 1}), store, None)
    assert other.study_name != first.study_name
    assert other.n_trials == 1
    assert len(_study(first).trials) == 5, "the first study is untouched"


def test_a_continued_study_does_not_repeat_the_points_already_tried(store: LocalStore) -> None:
    space = {"model.dropout": _FLOAT}
    _search(_config({"space": space, "n_trials": 1}), store, None)
    result = _search(_config({"space": space, "n_trials": 2}), store, None)
    first, second = _study(result).trials
    assert second.params != first.params


# ------------------------------------------------------------------------ parallel workers
def test_parallel_workers_fill_the_study_with_mlflow_runs_for_every_trial(
    store: LocalStore, tracker: Tracker, tracking: ParentRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    def after_worker_1s_first_trial(spec: WorkerSpec, **kwargs: Any) -> None:
        """Worker 0 (here) would run every tiny trial before worker 1 has warmed up: it waits for worker 1's first."""
        deadline = time.monotonic() + 300
        while not optuna.load_study(study_name=spec.study_name, storage=kwargs["storage"]).get_trials(deepcopy=False):
            assert time.monotonic() < deadline, "worker 1 started no trial"
            time.sleep(0.1)
        run_worker(spec, **kwargs)

    monkeypatch.setattr(hpo_search_module, "run_worker", after_worker_1s_first_trial)
    cfg = _config({"space": {"model.dropout": _FLOAT}, "n_trials": 4, "parallelism": 2})
    result = _search(cfg, store, tracking)  # worker 0 here, worker 1 in a spawned process

    study = _study(result)
    # Each worker checks the count, then asks for a trial: two workers checking at once can add one
    # trial too many. What is guaranteed is at least n_trials and at most n_trials + parallelism - 1.
    assert 4 <= result.n_trials <= 5
    assert result.n_trials == result.n_complete == len(study.trials)
    assert [t.number for t in study.trials] == list(range(result.n_trials))
    _assert_runs_match_trials(study, _trial_runs(tracker, tracking))


def _idle_workers(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    """hpo_search's spawned workers become stand-ins that never take up work, as if still warming up."""
    workers: list[SimpleNamespace] = []

    def process(target: Any, args: tuple[Any, ...], name: str) -> SimpleNamespace:
        worker = SimpleNamespace(name=name, exitcode=0, terminated=False, start=lambda: None, join=lambda: None)
        worker.terminate = lambda: setattr(worker, "terminated", True)
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
    cfg = _config({"space": {"model.dropout": _FLOAT}, "n_trials": 2, "parallelism": 2})
    assert _search(cfg, store, None).n_trials == 2
    assert torch.get_num_threads() == threads
    assert workers[0].terminated, "worker 0 ran every trial; worker 1, still warming up, was stopped"

    def worker_0(spec: WorkerSpec, **kwargs: Any) -> None:
        assert workers[1].terminated, "no trial is left: worker 1 is stopped before worker 0 starts"
        run_worker(spec, **kwargs)

    monkeypatch.setattr(hpo_search_module, "run_worker", worker_0)
    assert _search(cfg, store, None).n_trials == 2  # the same study, complete: continued, not extended


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


# -------------------------------------------------------------------------- LR bounds
def test_lr_bounds_come_from_the_range_test(store: LocalStore, tracker: Tracker, tracking: ParentRun) -> None:
    cfg = _config({"space": {"optim.lr": {"type": "float", "log": True}}, "n_trials": 3}, lr_range_test=True)
    result = _search(cfg, store, tracking, _lr_range(store, 0.02, "valley"))

    assert result.lr_bounds == pytest.approx((0.002, 0.06))
    study = _study(result)
    assert study.trials[0].distributions["optim.lr"] == optuna.distributions.FloatDistribution(0.002, 0.06, log=True)
    lrs = [t.params["optim.lr"] for t in study.trials]
    assert len(set(lrs)) == 3 and all(0.002 <= lr <= 0.06 for lr in lrs)
    runs = _trial_runs(tracker, tracking)
    assert sorted(float(run.data.params["optim.lr"]) for run in runs.values()) == sorted(lrs)


@pytest.mark.parametrize(
    ("spec", "bounds"),
    [
        (FloatParam(type="float", log=True), (0.002, 0.06)),
        (FloatParam(type="float", low=0.005), (0.005, 0.06)),
        (FloatParam(type="float", high=0.01), (0.002, 0.01)),
        (FloatParam(type="float", low=0.001, high=0.1, log=True), None),
        (CategoricalParam(type="categorical", choices=[0.001, 0.01]), None),
    ],
)
def test_only_missing_lr_bounds_are_taken_from_the_suggestion(
    spec: FloatParam | CategoricalParam, bounds: tuple[float, float] | None, store: LocalStore
) -> None:
    space = {"optim.lr": spec, "model.dropout": FloatParam(**_FLOAT)}
    resolved, lr_bounds = resolve_space(space, _lr_range(store, 0.02, "valley"))
    assert resolved["model.dropout"] == space["model.dropout"]
    if bounds is None:
        assert lr_bounds is None and resolved["optim.lr"] == spec
    else:
        assert lr_bounds == pytest.approx(bounds)
        assert resolved["optim.lr"] == FloatParam(type="float", low=bounds[0], high=bounds[1], log=True)


def test_a_given_lr_bound_beyond_the_suggested_range_is_named(store: LocalStore) -> None:
    with pytest.raises((ConfigError, TrainingError), match=r"tune\.hpo\.space\.optim\.lr"):
        resolve_space({"optim.lr": FloatParam(type="float", low=0.1)}, _lr_range(store, 0.02, "valley"))


# ------------------------------------------------------------------- list choices, record
def test_list_choices_come_back_as_lists_and_merge_into_the_config(
    store: LocalStore, tracker: Tracker, tracking: ParentRun
) -> None:
    space = {
        "model.hidden_sizes": {"type": "categorical", "choices": [[16], [32, 32]]},
        "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
    }
    cfg = _config({"space": space, "n_trials": 3})
    result = _search(cfg, store, tracking)

    study = _study(result)
    assert result.n_complete == 3
    assert result.best_value == study.best_value and result.best_trial == study.best_trial.number
    assert (result.metric, result.direction) == ("val/loss", "minimize")
    assert result.best_params["model.hidden_sizes"] in ([16], [32, 32])
    runs = _trial_runs(tracker, tracking)
    _assert_runs_match_trials(study, runs)
    best_run = runs[f"trial-{result.best_trial}"]
    assert best_run.data.params["model.hidden_sizes"] == str(result.best_params["model.hidden_sizes"])

    tuned, changes = apply_tuning(cfg, None, result)
    assert changes == result.best_params
    assert tuned.model.hidden_sizes == result.best_params["model.hidden_sizes"]
    assert tuned.optim.lr == result.best_params["optim.lr"]

    assert set(result.importances) == {"model.hidden_sizes", "optim.lr"}
    assert sum(result.importances.values()) == pytest.approx(1.0)
    assert result.artifact_uris() == [result.plot_uri]
    plot = store.local_path(result.plot_uri)
    assert plot == store.root / KEY / "optimization_history.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert result.storage == f"sqlite:///{store.root / 'hpo' / 'optuna.db'}"
    assert Path(result.storage.removeprefix("sqlite:///")).is_file()


def test_importances_are_empty_below_two_complete_trials(store: LocalStore) -> None:
    space = {"model.dropout": _FLOAT, "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}
    result = _search(_config({"space": space, "n_trials": 1}), store, None)
    assert result.n_complete == 1
    assert result.importances == {}


def test_the_grid_sampler_searches_every_categorical_choice(store: LocalStore, tracking: ParentRun) -> None:
    space = {"model.hidden_sizes": {"type": "categorical", "choices": [[16], [32, 32]]}}
    result = _search(_config({"space": space, "sampler": "grid", "n_trials": 2}), store, tracking)
    assert result.n_complete == 2
    tried = sorted(str(t.params["model.hidden_sizes"]) for t in _study(result).trials)
    assert tried == ["json:[16]", "json:[32, 32]"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://optuna:secret@db.example:5432/hpo", "postgresql://optuna:***@db.example:5432/hpo"),
        ("mysql+pymysql://u:p@host/db", "mysql+pymysql://u:***@host/db"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
    ],
)
def test_the_storage_is_shown_without_its_password(url: str, shown: str) -> None:
    assert hpo_search_module._without_password(url) == shown


@pytest.mark.parametrize(("sampler", "pruner"), [("tpe", "hyperband"), ("gp", "median"), ("random", "none")])
def test_every_sampler_and_pruner_runs_a_study(sampler: str, pruner: str, store: LocalStore) -> None:
    space = {"model.dropout": _FLOAT, "train.batch_size": {"type": "categorical", "choices": [16, 32]}}
    result = _search(_config({"space": space, "sampler": sampler, "pruner": pruner, "n_trials": 4}), store, None)
    assert result.n_trials == 4 and result.n_complete >= 1 and result.n_failed == 0
    assert set(result.best_params) == {"model.dropout", "train.batch_size"}
    assert 0.0 <= result.best_params["model.dropout"] <= 0.5 and result.best_params["train.batch_size"] in (16, 32)
