"""Merge the tuning stages' results into the config the training stage gets."""

from __future__ import annotations

import json
from typing import Any

from core.config import Config, TrainConfig, config_from_dict
from core.hpo_search import HPOSearchResult
from core.lr_range_test import LRRangeTestResult, suggestion_or_error


def apply_tuning(
    config: Config, lr_test: LRRangeTestResult | None, search: HPOSearchResult | None
) -> tuple[Config, dict[str, Any]]:
    """The config with `optim.lr: auto` resolved and the search's best parameters applied.

    Returns the tuned config and the values that changed (dotted path -> value), for the summary.

    Raises:
        TrainingError: optim.lr is auto but the range test gave no suggestion (its reason is quoted).
    """
    changes: dict[str, Any] = {}
    searched_lr = search is not None and "optim.lr" in search.best_params
    if config.optim.lr == "auto" and not searched_lr:
        changes["optim.lr"] = suggestion_or_error(lr_test, "optim.lr: 'auto'", "set optim.lr")
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
