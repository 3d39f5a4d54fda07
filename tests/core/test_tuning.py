"""Tuning results into the training config: `optim.lr: auto`, best parameters, the tuning view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.core.test_lr_range_test import _config
from trainflow.core.config import TrainConfig, load_config
from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.records import HPOSearchResult, LRRangeTestResult, stage_key
from trainflow.core.tuning.apply import apply_tuning, lr_range_test_plan, tuning_view
from trainflow.core.tuning.lr_finder import RULES


def _lr_range(suggested_lr: float | None, reason: str = "inside the longest descent") -> LRRangeTestResult:
    return LRRangeTestResult(
        suggested_lr=suggested_lr, rule="valley", reason=reason, num_steps_run=30, diverged=False,
        suggestions=dict.fromkeys(RULES, suggested_lr), curve_uri="file:///c.json", plot_uri="file:///p.png",
    )  # fmt: skip


def test_auto_lr_takes_the_suggestion_and_reports_it() -> None:
    config = _config(optim={"lr": "auto"})
    tuned, changes = apply_tuning(config, _lr_range(0.0123), None)
    assert tuned.optim.lr == 0.0123
    assert changes == {"optim.lr": 0.0123}
    assert tuned.model_dump(exclude={"optim": {"lr"}}) == config.model_dump(exclude={"optim": {"lr"}})


@pytest.mark.parametrize(
    ("lr_range", "reason"),
    [
        (_lr_range(None, "the smoothed loss did not decrease between LR 1e-06 and 1"), "did not decrease"),
        (None, "the LR range test did not run"),
    ],
)
def test_auto_lr_without_a_suggestion_quotes_the_reason(lr_range: LRRangeTestResult | None, reason: str) -> None:
    with pytest.raises(
        TrainingError, match=rf"optim\.lr: 'auto' needs the LR range test's suggestion.*\(.*{reason}.*\); set optim\.lr"
    ):
        apply_tuning(_config(optim={"lr": "auto"}), lr_range, None)


def test_a_numeric_lr_ignores_the_suggestion() -> None:
    config = _config(optim={"lr": 0.01})
    tuned, changes = apply_tuning(config, _lr_range(0.5), None)
    assert tuned.optim.lr == 0.01
    assert changes == {}


def test_auto_lr_is_resolved_by_a_search_over_optim_lr_without_the_range_test() -> None:
    # The config check accepts this (core/config.py: searched_lr provides the auto LR).
    config = _config(optim={"lr": "auto"}, tune={"lr_range_test": {"enabled": False}, "hpo": {
        "enabled": True, "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}}}})  # fmt: skip
    search = HPOSearchResult(
        study_name="s", storage="sqlite://", n_trials=2, n_complete=2, n_pruned=0, n_failed=0,
        best_params={"optim.lr": 0.003}, best_value=0.5, best_trial=1, metric="val/loss", direction="minimize",
        lr_bounds=None, importances={}, plot_uri="file:///h.png",
    )  # fmt: skip
    tuned, changes = apply_tuning(config, None, search)
    assert tuned.optim.lr == 0.003
    assert changes == {"optim.lr": 0.003}


@pytest.mark.parametrize(
    ("update", "same_key"),
    [
        ({"max_epochs": 50}, True),
        ({"max_steps": 7}, True),
        ({"early_stopping": {"patience": 2, "enabled": False}}, True),
        ({"checkpoint": {"every_steps": 10, "keep_last": 5}}, True),
        ({"eval_every_steps": 3, "log_every_steps": 1, "resume": False, "progress_bar": True}, True),
        ({"batch_size": 32}, False),
        ({"precision": "bf16"}, False),
        ({"grad_accum_steps": 2}, False),
        ({"grad_clip_norm": None}, False),
    ],
)
def test_tuning_view_keeps_what_tuning_computes_with_and_drops_the_loop_settings(
    update: dict[str, Any], same_key: bool
) -> None:
    base, changed = TrainConfig(progress_bar=False), TrainConfig(**({"progress_bar": False} | update))
    keys = [stage_key("lr_range_test", {"train_cfg": tuning_view(t)}) for t in (base, changed)]
    assert (keys[0] == keys[1]) is same_key
    if not same_key:
        name, value = next(iter(update.items()))
        assert getattr(tuning_view(changed), name) == value


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        (
            {"tune": {"lr_range_test": {"enabled": False}}},
            r"optim\.lr: 'auto' needs the LR range test, but tune\.lr_range_test\.enabled is false",
        ),
        ({"tune": {"lr_range_test": {"min_lr": 0.1, "max_lr": 0.1}}}, r"tune\.lr_range_test: min_lr=0.1 must be below"),
        ({"tune": {"lr_range_test": {"min_lr": 1.0, "max_lr": 0.1}}}, r"tune\.lr_range_test: min_lr=1 must be below"),
        (
            {"tune": {"lr_range_test": {"num_steps": 20, "skip_start": 10, "skip_end": 5}}},
            r"tune\.lr_range_test: skip_start \+ skip_end \+ 10 must not exceed num_steps=20",
        ),
    ],
)
def test_tuning_config_errors_name_the_field(sections: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        _config(optim={"lr": "auto"}, **sections)


@pytest.mark.parametrize(
    "tune",
    [
        {},  # the range test is on by default
        {"lr_range_test": {"enabled": False}, "hpo": {
            "enabled": True, "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}}}},
    ],
    ids=["range-test", "search-over-optim-lr"],
)  # fmt: skip
def test_auto_lr_is_accepted_when_something_provides_it(tune: dict[str, Any]) -> None:
    assert _config(optim={"lr": "auto"}, tune=tune).optim.lr == "auto"


# ------------------------------------------------------------------ which tuning stages run
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("config", "runs", "why"),
    [
        (CONFIGS / "digits.yaml", True, "tune.hpo.space.optim.lr takes its bounds from the suggestion"),
        (CONFIGS / "text_gpt.yaml", False, "nothing uses its suggestion (optim.lr is 0.002 and no search"),
        (CONFIGS / "wine_mlp.yaml", False, "nothing uses its suggestion (optim.lr is 0.003 and no search"),
    ],
    ids=["digits", "text_gpt", "wine_mlp"],
)
def test_shipped_configs_run_the_lr_range_test_only_where_its_suggestion_is_used(
    config: Path, runs: bool, why: str
) -> None:
    needed, reason = lr_range_test_plan(load_config(config))
    assert needed is runs and reason.startswith(why)


@pytest.mark.parametrize(
    ("sections", "runs", "why"),
    [
        ({"optim": {"lr": "auto"}}, True, "optim.lr is auto"),
        ({"optim": {"lr": 0.01}}, False, "nothing uses its suggestion"),
        ({"optim": {"lr": 0.01}, "tune": {"lr_range_test": {"enabled": True}}}, True,
         "tune.lr_range_test.enabled is true"),
        ({"optim": {"lr": "auto"}, "tune": {"hpo": {"enabled": True, "space": {
            "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1}}}}}, False, "nothing uses its suggestion"),
        ({"optim": {"lr": 0.01}, "tune": {"hpo": {"enabled": True, "space": {
            "optim.lr": {"type": "float", "log": True}}}}}, True, "tune.hpo.space.optim.lr takes its bounds"),
        ({"optim": {"lr": 0.01}, "tune": {"lr_range_test": {"enabled": False}}}, False,
         "tune.lr_range_test.enabled is false"),
    ],
    ids=["auto-lr", "fixed-lr", "asked-for", "searched-lr-with-bounds", "searched-lr-without-bounds", "disabled"],
)  # fmt: skip
def test_the_lr_range_test_runs_when_its_suggestion_is_used_or_asked_for(
    sections: dict[str, Any], runs: bool, why: str
) -> None:
    needed, reason = lr_range_test_plan(_config(**sections))
    assert needed is runs and reason.startswith(why), reason
