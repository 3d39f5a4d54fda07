"""How the tuning stages feed training: whether each runs and why, the spec each one takes, and the tuned config
and spec the training gets. Where the learning rate comes from is decided here, and only here:

- `optim.lr: 0.01`: that number, unless the search draws `optim.lr`;
- `optim.lr: auto`: the LR range test's suggestion, unless the search draws `optim.lr`;
- a search over `optim.lr`: its best trial's value; without bounds its range is the suggestion /10 .. x3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainflow.core.config import CategoricalParam, Config, FloatParam, ParamSpec
from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.records import HPOSearchResult, LRRangeTestResult, PrepareDataResult
from trainflow.core.training.spec import TrainingSpec


@dataclass(frozen=True)
class Tuned:
    """What the tuning stages decided: the values (dotted config path -> value), the config with them applied
    (published as the run's config.yaml) and the spec the training takes."""

    changes: dict[str, Any]
    config: Config
    spec: TrainingSpec


def lr_range_test_plan(config: Config) -> tuple[bool, str]:
    """Whether the lr_range_test stage runs, and why (one line for the log and the Prefect UI).

    It runs when its suggestion is used (`optim.lr: auto` with no searched LR, or a search space whose
    `optim.lr` has no bounds) or when `tune.lr_range_test.enabled` is true; otherwise it is skipped.
    """
    enabled, use = config.tune.lr_range_test.enabled, _lr_suggestion_use(config)
    if enabled is False:
        return False, "tune.lr_range_test.enabled is false"
    if use is not None:
        return True, use
    if enabled is True:
        return True, "tune.lr_range_test.enabled is true (its suggestion is logged, not used)"
    return False, (
        f"nothing uses its suggestion (optim.lr is {config.optim.lr} and no search takes optim.lr's bounds from it); "
        "set tune.lr_range_test.enabled: true to run it anyway"
    )


def hpo_search_plan(config: Config) -> tuple[bool, str]:
    """Whether the hpo_search stage runs, and why."""
    if config.tune.hpo.enabled:
        return True, f"tune.hpo.enabled: {len(config.tune.hpo.space)} parameter(s), {config.tune.hpo.n_trials} trials"
    return False, "tune.hpo.enabled is false"


def lr_range_test_spec(config: Config, data: PrepareDataResult) -> TrainingSpec | None:
    """The range test's training: the loop at its defaults, the LR at the sweep's start (`min_lr`); None when the
    stage does not run (`lr_range_test_plan`)."""
    if not lr_range_test_plan(config)[0]:
        return None
    return TrainingSpec.of(config, data, lr=config.tune.lr_range_test.min_lr).for_tuning()


def search_spec(config: Config, data: PrepareDataResult, lr_range: LRRangeTestResult | None) -> TrainingSpec | None:
    """The training every trial starts from: the loop at its defaults (the search sets its own budget); the LR the
    training would have, or, when the search draws `optim.lr` (every trial sets its own), the low end of its range.
    None when the search does not run (`hpo_search_plan`).

    Raises:
        TrainingError: the LR needs the range test's suggestion and there is none (its reason is quoted).
    """
    if not hpo_search_plan(config)[0]:
        return None
    searched = config.tune.hpo.space.get("optim.lr")
    if searched is not None:
        lr = _low_end(resolve_space({"optim.lr": searched}, lr_range)[0]["optim.lr"])
    elif config.optim.lr == "auto":
        lr = lr_suggestion(lr_range, "optim.lr: 'auto'", "set optim.lr")
    else:
        lr = config.optim.lr
    return TrainingSpec.of(config, data, lr=lr).for_tuning()


def tuned(
    config: Config, data: PrepareDataResult, lr_range: LRRangeTestResult | None, search: HPOSearchResult | None
) -> Tuned:
    """The config with `optim.lr: auto` resolved and the search's best values applied, and its training spec.

    Raises:
        TrainingError: optim.lr is auto but the range test gave no suggestion (its reason is quoted).
    """
    changes: dict[str, Any] = {}
    searched_lr = search is not None and "optim.lr" in search.best_params
    if config.optim.lr == "auto" and not searched_lr:
        changes["optim.lr"] = lr_suggestion(lr_range, "optim.lr: 'auto'", "set optim.lr")
    if search is not None:
        changes |= search.best_params
    tuned_config = config.with_values(changes)
    suggestion = lr_range.suggested_lr if lr_range is not None else None  # the doctor compares optim.lr with it
    return Tuned(changes, tuned_config, TrainingSpec.of(tuned_config, data, lr_suggestion=suggestion))


def resolve_space(
    space: dict[str, ParamSpec], lr_range: LRRangeTestResult | None
) -> tuple[dict[str, ParamSpec], tuple[float, float] | None]:
    """The search space with `optim.lr`'s missing bounds taken from the suggestion: /10 .. x3, log-uniform.
    Returns the space and those bounds (None when the space gave its own)."""
    spec = space.get("optim.lr")
    if not isinstance(spec, FloatParam) or (spec.low is not None and spec.high is not None):
        return dict(space), None
    suggestion = lr_suggestion(lr_range, "tune.hpo.space.optim.lr:", "set a value")
    low, high = spec.low or suggestion / 10, spec.high or suggestion * 3
    if low >= high:
        raise ConfigError(
            f"tune.hpo.space.optim.lr: low={low:g} is not below high={high:g}, the bound derived from the LR range "
            f"test's suggestion {suggestion:.3g}; give both bounds or neither"
        )
    return space | {"optim.lr": FloatParam(type="float", low=low, high=high, log=True)}, (low, high)


def lr_suggestion(lr_range: LRRangeTestResult | None, field: str, fix: str) -> float:
    """The suggested LR, or a TrainingError naming who needs it and quoting why there is none."""
    if lr_range is None or lr_range.suggested_lr is None:
        reason = lr_range.reason if lr_range else "the LR range test did not run"
        raise TrainingError(f"{field} needs the LR range test's suggestion, but there is none ({reason}); {fix}")
    return lr_range.suggested_lr


def _lr_suggestion_use(config: Config) -> str | None:
    hpo = config.tune.hpo
    searched = hpo.space.get("optim.lr") if hpo.enabled else None
    if isinstance(searched, FloatParam) and (searched.low is None or searched.high is None):
        return "tune.hpo.space.optim.lr takes its bounds from the suggestion"
    if config.optim.lr == "auto" and searched is None:
        return "optim.lr is auto"
    return None


def _low_end(spec: ParamSpec) -> float:
    if isinstance(spec, CategoricalParam):
        return float(min(spec.choices))
    assert spec.low is not None, "bounds are resolved"
    return float(spec.low)
