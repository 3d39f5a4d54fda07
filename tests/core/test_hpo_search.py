"""The hpo_search stage on wine and a small MLP: the search space checked before any trial, pruned
and failed trials recorded in Optuna and MLflow alike, a study continued across runs, parallel
worker processes, LR bounds from the range test, and the result record.

Trials log to MLflow on a temporary SQLite file, as child runs of a real parent run (the branch the
pipeline takes); the Optuna study lives in the store's default SQLite file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.core.hpo_support import *  # noqa: F403  fixtures: one_torch_thread, tracker, tracking
from tests.core.hpo_support import (
    FLOAT,
    KEY,
    assert_runs_match_trials,
    lr_range_record,
    parent_run,
    search,
    search_config,
    study_of,
    trial_runs,
)
from trainflow.core.config import CategoricalParam, FloatParam
from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.hpo_search import resolve_space
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.tracking.runs import RunLogger, Tracker
from trainflow.core.tuning.plan import tuned

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------- checks before any trial


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
    tracking: RunLogger,
) -> None:
    cfg = search_config({"space": {"model.dropout": FLOAT}} | hpo, lr_range_test=True)
    with pytest.raises(error, match=match):
        search(cfg, store, tracking, lr_range_record(store, *lr_range) if lr_range else None)
    assert not (store.root / "hpo").exists(), "no Optuna study was created"
    assert not trial_runs(tracker, tracking)


# ------------------------------------------------------------------------------- pruning
def test_a_pruned_trial_is_a_killed_mlflow_run_with_its_epochs_logged(
    store: LocalStore, tracker: Tracker, tracking: RunLogger
) -> None:
    # Random sampler, seed 5 draws lr 1e-2, 1e-2, 1e-2, 1e-7, 1e-7: the median pruner (3 startup trials)
    # then holds three identical good curves, and the hopeless 1e-7 trials fall above their median.
    space = {"optim.lr": {"type": "categorical", "choices": [1e-7, 1e-2]}}
    median = {"pruner": "median", "pruner_startup_trials": 3, "pruner_warmup_evals": 1}
    cfg = search_config({"space": space, "seed": 5, "n_trials": 5} | median)
    result = search(cfg, store, tracking)

    study = study_of(result)
    assert [(t.params["optim.lr"], t.state.name) for t in study.trials] == [
        (1e-2, "COMPLETE"), (1e-2, "COMPLETE"), (1e-2, "COMPLETE"), (1e-7, "PRUNED"), (1e-7, "PRUNED")
    ]  # fmt: skip
    assert (result.n_trials, result.n_complete, result.n_pruned, result.n_failed) == (5, 3, 2, 0)
    runs = trial_runs(tracker, tracking)
    assert_runs_match_trials(study, runs)
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
    store: LocalStore, tracker: Tracker, tracking: RunLogger
) -> None:
    # Seed 0 draws fp16, fp32, fp16: the first trial already fails (fp16 autocast needs CUDA).
    cfg = search_config(
        {"space": {"train.precision": {"type": "categorical", "choices": ["fp32", "fp16"]}}, "n_trials": 3}
    )
    result = search(cfg, store, tracking)

    study = study_of(result)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL"]
    assert (result.n_trials, result.n_complete, result.n_pruned, result.n_failed) == (3, 1, 0, 2)
    assert result.best_trial == 1
    assert result.best_params == {"train.precision": "fp32"}
    runs = trial_runs(tracker, tracking)
    assert_runs_match_trials(study, runs)
    message = "train.precision: 'fp16' needs a CUDA device, this run uses cpu; use bf16"
    for trial in (study.trials[0], study.trials[2]):
        assert trial.user_attrs["error"] == f"ConfigError: {message}"
        assert runs[f"trial-{trial.number}"].data.tags["trainflow.trial_note"] == message


def test_when_every_trial_fails_the_first_error_is_raised(
    store: LocalStore, tracker: Tracker, tracking: RunLogger
) -> None:
    cfg = search_config({"space": {"train.precision": {"type": "categorical", "choices": ["fp16"]}}, "n_trials": 2})
    with pytest.raises(
        TrainingError,
        match=r"hpo_search: none of 2 trials completed; first error: ConfigError: train\.precision: 'fp16' needs",
    ):
        search(cfg, store, tracking)
    assert sorted((name, run.info.status) for name, run in trial_runs(tracker, tracking).items()) == [
        ("trial-0", "FAILED"), ("trial-1", "FAILED")
    ]  # fmt: skip


# ----------------------------------------------------------------------------- continuing
def test_a_rerun_continues_the_study_and_a_changed_space_starts_a_new_one(
    store: LocalStore, tracker: Tracker, tracking: RunLogger
) -> None:
    space = {"model.dropout": FLOAT}
    first = search(search_config({"space": space, "n_trials": 3}), store, tracking)
    assert first.n_trials == 3

    again = parent_run(tracker, "rerun")
    second = search(search_config({"space": space, "n_trials": 5}), store, again)
    assert second.study_name == first.study_name
    assert second.storage == first.storage == f"sqlite:///{store.root / 'hpo' / 'optuna.db'}"
    assert (second.n_trials, second.n_complete) == (5, 5)
    assert [t.number for t in study_of(second).trials] == [0, 1, 2, 3, 4]
    assert sorted(trial_runs(tracker, tracking)) == ["trial-0", "trial-1", "trial-2"]
    assert sorted(trial_runs(tracker, again)) == ["trial-3", "trial-4"], "only the missing trials ran"

    other = search(search_config({"space": {"model.dropout": {**FLOAT, "high": 0.4}}, "n_trials": 1}), store, None)
    assert other.study_name != first.study_name
    assert other.n_trials == 1
    assert len(study_of(first).trials) == 5, "the first study is untouched"


def test_a_continued_study_does_not_repeat_the_points_already_tried(store: LocalStore) -> None:
    space = {"model.dropout": FLOAT}
    search(search_config({"space": space, "n_trials": 1}), store, None)
    result = search(search_config({"space": space, "n_trials": 2}), store, None)
    first, second = study_of(result).trials
    assert second.params != first.params


# -------------------------------------------------------------------------- LR bounds
def test_lr_bounds_come_from_the_range_test(store: LocalStore, tracker: Tracker, tracking: RunLogger) -> None:
    cfg = search_config({"space": {"optim.lr": {"type": "float", "log": True}}, "n_trials": 3}, lr_range_test=True)
    result = search(cfg, store, tracking, lr_range_record(store, 0.02, "valley"))

    assert result.lr_bounds == pytest.approx((0.002, 0.06))
    study = study_of(result)
    assert study.trials[0].distributions["optim.lr"] == optuna.distributions.FloatDistribution(0.002, 0.06, log=True)
    lrs = [t.params["optim.lr"] for t in study.trials]
    assert len(set(lrs)) == 3 and all(0.002 <= lr <= 0.06 for lr in lrs)
    runs = trial_runs(tracker, tracking)
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
    space = {"optim.lr": spec, "model.dropout": FloatParam(**FLOAT)}
    resolved, lr_bounds = resolve_space(space, lr_range_record(store, 0.02, "valley"))
    assert resolved["model.dropout"] == space["model.dropout"]
    if bounds is None:
        assert lr_bounds is None and resolved["optim.lr"] == spec
    else:
        assert lr_bounds == pytest.approx(bounds)
        assert resolved["optim.lr"] == FloatParam(type="float", low=bounds[0], high=bounds[1], log=True)


def test_a_given_lr_bound_beyond_the_suggested_range_is_named(store: LocalStore) -> None:
    with pytest.raises((ConfigError, TrainingError), match=r"tune\.hpo\.space\.optim\.lr"):
        resolve_space({"optim.lr": FloatParam(type="float", low=0.1)}, lr_range_record(store, 0.02, "valley"))


# ------------------------------------------------------------------- list choices, record
def test_list_choices_come_back_as_lists_and_merge_into_the_config(
    store: LocalStore, tracker: Tracker, tracking: RunLogger
) -> None:
    space = {
        "model.hidden_sizes": {"type": "categorical", "choices": [[16], [32, 32]]},
        "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
    }
    cfg = search_config({"space": space, "n_trials": 3})
    result = search(cfg, store, tracking)

    study = study_of(result)
    assert result.n_complete == 3
    assert result.best_value == study.best_value and result.best_trial == study.best_trial.number
    assert (result.metric, result.direction) == ("val/loss", "minimize")
    assert result.best_params["model.hidden_sizes"] in ([16], [32, 32])
    runs = trial_runs(tracker, tracking)
    assert_runs_match_trials(study, runs)
    best_run = runs[f"trial-{result.best_trial}"]
    assert best_run.data.params["model.hidden_sizes"] == str(result.best_params["model.hidden_sizes"])

    tuning = tuned(cfg, prepare_data(cfg.data, cfg.seed, store), None, result)
    assert tuning.changes == result.best_params
    assert tuning.spec.model.hidden_sizes == result.best_params["model.hidden_sizes"]  # type: ignore[union-attr]
    assert tuning.spec.optim.lr == result.best_params["optim.lr"]

    assert set(result.importances) == {"model.hidden_sizes", "optim.lr"}
    assert sum(result.importances.values()) == pytest.approx(1.0)
    assert result.artifact_uris() == [result.plot_uri]
    plot = store.local_path(result.plot_uri)
    assert plot == store.root / KEY / "optimization_history.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert result.storage == f"sqlite:///{store.root / 'hpo' / 'optuna.db'}"
    assert Path(result.storage.removeprefix("sqlite:///")).is_file()


def test_importances_are_empty_below_two_complete_trials(store: LocalStore) -> None:
    space = {"model.dropout": FLOAT, "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}
    result = search(search_config({"space": space, "n_trials": 1}), store, None)
    assert result.n_complete == 1
    assert result.importances == {}


def test_the_grid_sampler_searches_every_categorical_choice(store: LocalStore, tracking: RunLogger) -> None:
    space = {"model.hidden_sizes": {"type": "categorical", "choices": [[16], [32, 32]]}}
    result = search(search_config({"space": space, "sampler": "grid", "n_trials": 2}), store, tracking)
    assert result.n_complete == 2
    tried = sorted(str(t.params["model.hidden_sizes"]) for t in study_of(result).trials)
    assert tried == ["json:[16]", "json:[32, 32]"]
