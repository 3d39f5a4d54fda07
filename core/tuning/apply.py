"""How the tuning stages feed training: whether each runs, what the LR range test's suggestion is
used for, and the tuned config the train stage gets."""

from __future__ import annotations

import json
from typing import Any

from trainflow.core.config import Config, FloatParam, TrainConfig, config_from_dict
from trainflow.core.errors import TrainingError
from trainflow.core.records import HPOSearchResult, LRRangeTestResult


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


def _lr_suggestion_use(config: Config) -> str | None:
    hpo = config.tune.hpo
    searched = hpo.space.get("optim.lr") if hpo.enabled else None
    if isinstance(searched, FloatParam) and (searched.low is None or searched.high is None):
        return "tune.hpo.space.optim.lr takes its bounds from the suggestion"
    if config.optim.lr == "auto" and searched is None:
        return "optim.lr is auto"
    return None


def lr_suggestion(lr_range: LRRangeTestResult | None, field: str, fix: str) -> float:
    """The suggested LR, or a TrainingError naming who needs it and quoting why there is none."""
    if lr_range is None or lr_range.suggested_lr is None:
        reason = lr_range.reason if lr_range else "the LR range test did not run"
        raise TrainingError(f"{field} needs the LR range test's suggestion, but there is none ({reason}); {fix}")
    return lr_range.suggested_lr


def apply_tuning(
    config: Config, lr_range: LRRangeTestResult | None, search: HPOSearchResult | None
) -> tuple[Config, dict[str, Any]]:
    """The config with `optim.lr: auto` resolved and the search's best parameters applied.

    Returns the tuned config and the values that changed (dotted path -> value), for the summary.

    Raises:
        TrainingError: optim.lr is auto but the range test gave no suggestion (its reason is quoted).
    """
    changes: dict[str, Any] = {}
    searched_lr = search is not None and "optim.lr" in search.best_params
    if config.optim.lr == "auto" and not searched_lr:
        changes["optim.lr"] = lr_suggestion(lr_range, "optim.lr: 'auto'", "set optim.lr")
    if search is not None:
        changes |= search.best_params
    if not changes:
        return config, changes
    raw = config.model_dump(mode="json")
    overrides = [f"{path}={json.dumps(value)}" for path, value in changes.items()]
    tuned = config_from_dict(raw, overrides, source="tuning", override_source="tuning")
    return tuned, changes


# How long and how often the loop runs, evaluates, logs and saves: tuning sets its own budget for these.
_LOOP_SETTINGS = ("max_epochs", "max_steps", "early_stopping", "checkpoint", "eval_every_steps", "log_every_steps",
                  "resume", "progress_bar")  # fmt: skip


def tuning_view(train: TrainConfig) -> TrainConfig:
    """The training settings the tuning stages depend on (batch, accumulation, precision, clipping,
    device), the rest at defaults: their cache keys then ignore e.g. `train.max_epochs`, so training
    longer re-runs the training stage only."""
    defaults = TrainConfig()
    return train.model_copy(update={name: getattr(defaults, name) for name in _LOOP_SETTINGS})
