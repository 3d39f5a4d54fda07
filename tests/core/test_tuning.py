"""Tuning results into the training spec: where the LR comes from (`core.tuning.plan`), the search's best values,
typed by the schema (`TrainingSpec.with_values`), and the spec the tuning stages key their cache on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.core.test_lr_range_test import _config
from trainflow.core.config import CNNConfig, Config, load_config
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.records import HPOSearchResult, LRRangeTestResult, PrepareDataResult, stage_key
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.tuning.lr_finder import RULES
from trainflow.core.tuning.plan import lr_range_test_plan, lr_range_test_spec, search_spec, tuned

DATA = PrepareDataResult(fingerprint="f" * 64, uri="file:///data.npz", source="sklearn:wine", n_train=124, n_val=27,
                         n_test=27, spec=DataSpec(task="classification", input_shape=(13,), n_classes=3))  # fmt: skip
SEARCHED_LR = {"enabled": True, "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}}}


def _lr_range(suggested_lr: float | None, reason: str = "inside the longest descent") -> LRRangeTestResult:
    return LRRangeTestResult(
        suggested_lr=suggested_lr, rule="valley", reason=reason, num_steps_run=30, diverged=False,
        suggestions=dict.fromkeys(RULES, suggested_lr), curve_uri="file:///c.json", plot_uri="file:///p.png",
    )  # fmt: skip


def _search(best_params: dict[str, Any]) -> HPOSearchResult:
    return HPOSearchResult(
        study_name="s", storage="sqlite://", n_trials=2, n_complete=2, n_pruned=0, n_failed=0, best_params=best_params,
        best_value=0.5, best_trial=1, metric="val/loss", direction="minimize", lr_bounds=None, importances={},
        plot_uri="file:///h.png",
    )  # fmt: skip


def test_auto_lr_takes_the_suggestion_and_reports_it() -> None:
    config = _config(optim={"lr": "auto"})
    result = tuned(config, DATA, _lr_range(0.0123), None)
    assert result.changes == {"optim.lr": 0.0123}
    assert result.config.optim.lr == result.spec.optim.lr == 0.0123
    assert result.config.model_dump(exclude={"optim": {"lr"}}) == config.model_dump(exclude={"optim": {"lr"}})
    assert result.spec == TrainingSpec.of(result.config, DATA, lr_suggestion=0.0123)  # the doctor compares with it


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
        tuned(_config(optim={"lr": "auto"}), DATA, lr_range, None)


def test_a_numeric_lr_ignores_the_suggestion() -> None:
    result = tuned(_config(optim={"lr": 0.01}), DATA, _lr_range(0.5), None)
    assert (result.spec.optim.lr, result.changes) == (0.01, {})


def test_auto_lr_is_resolved_by_a_search_over_optim_lr_without_the_range_test() -> None:
    config = _config(optim={"lr": "auto"}, tune={"lr_range_test": {"enabled": False}, "hpo": SEARCHED_LR})
    result = tuned(config, DATA, None, _search({"optim.lr": 0.003}))
    assert (result.spec.optim.lr, result.changes) == (0.003, {"optim.lr": 0.003})


def test_the_search_s_values_reach_the_spec_typed_by_the_schema() -> None:
    config = _config(optim={"lr": 0.01}, data={"source": "sklearn", "name": "digits"}, model={"name": "cnn"})
    best = {"model.channels": [8, 16], "train.batch_size": 32, "data.loader.num_workers": 1, "seed": 7,
            "optim.betas": [0.8, 0.9]}  # fmt: skip
    result = tuned(config, DATA, None, _search(best))
    spec = result.spec
    assert isinstance(spec.model, CNNConfig) and spec.model.channels == [8, 16]
    assert (spec.train.batch_size, spec.loader.num_workers, spec.seed) == (32, 1, 7)
    assert spec.optim.betas == (0.8, 0.9)  # a tuple, as the schema types it: no string round trip
    assert result.config.data.loader.num_workers == 1 and result.config.seed == 7


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"train.batch_size": 0}, r"^tuning: train\.batch_size: 0 must be >= 1"),
        ({"model.dropout": 1.5}, r"^tuning: model\.dropout: 1\.5 must be < 1"),
        ({"data.val_fraction": 0.2}, r"^tuning: data\.val_fraction: unknown key"),
        ({"optim.lr": "auto"}, r"^tuning: optim\.lr: 'auto'"),
    ],
)
def test_a_value_the_schema_rejects_is_a_config_error_naming_its_path(values: dict[str, Any], problem: str) -> None:
    spec = TrainingSpec.of(_config(optim={"lr": 0.01}), DATA)
    with pytest.raises(ConfigError, match=problem):
        spec.with_values(values)


def test_a_spec_never_holds_an_auto_lr() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr: 'auto' is decided by the tuning stages"):
        TrainingSpec.of(_config(optim={"lr": "auto"}), DATA)


def test_the_tuning_stages_get_a_concrete_lr() -> None:
    """The range test sweeps from min_lr; a search that draws optim.lr starts its trials from the range's low end,
    whatever the config's LR (so changing it does not re-run the search)."""
    config = _config(optim={"lr": "auto"}, tune={"lr_range_test": {"min_lr": 1e-5}})
    assert lr_range_test_spec(config, DATA).optim.lr == 1e-5  # type: ignore[union-attr]
    searched = [_config(optim={"lr": lr}, tune={"lr_range_test": {"enabled": False}, "hpo": SEARCHED_LR})
                for lr in ("auto", 0.05)]  # fmt: skip
    assert [search_spec(c, DATA, None).optim.lr for c in searched] == [1e-4, 1e-4]  # type: ignore[union-attr]
    bounds_from_test = _config(tune={"hpo": {"enabled": True, "space": {"optim.lr": {"type": "float", "log": True}}}})
    assert search_spec(bounds_from_test, DATA, _lr_range(0.02)).optim.lr == pytest.approx(0.002)  # type: ignore[union-attr]
    assert search_spec(_config(optim={"lr": 0.01}), DATA, None) is None  # no search, no spec


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
def test_the_tuning_spec_keeps_what_tuning_computes_with_and_drops_the_loop_settings(
    update: dict[str, Any], same_key: bool
) -> None:
    def key(train: dict[str, Any]) -> str:
        config = _config(optim={"lr": "auto"}, train={"progress_bar": False} | train)
        return stage_key("lr_range_test", {"spec": lr_range_test_spec(config, DATA)})

    assert (key({}) == key(update)) is same_key


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
    assert isinstance(load_config(config), Config)
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
