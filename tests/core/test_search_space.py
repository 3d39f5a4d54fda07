"""The search space is checked by the config schema with every value a trial may draw, before any trial."""

from __future__ import annotations

from typing import Any

import pytest

from tests.core.hpo_support import FLOAT, search_config
from trainflow.core.errors import ConfigError


@pytest.mark.parametrize(
    ("hpo", "lr_range_test", "match"),
    [
        ({"space": {"train.bach_size": {"type": "int", "low": 8, "high": 32}}}, True,
         r"tune\.hpo\.space\.train\.bach_size: not a config key \(unknown key; did you mean batch_size\?\)"),
        ({"space": {"train.batch_size": {"type": "float", "low": 8, "high": 32}}}, True,
         r"tune\.hpo\.space\.train\.batch_size: an inner value such as 20\.024 is not a valid train\.batch_size "
         r"\(20\.024: input should be a valid integer"),
        ({"space": {"model.dropout": {"type": "float", "low": 0.0, "high": 1.5}}}, True,
         r"tune\.hpo\.space\.model\.dropout: high 1\.5 is not a valid model\.dropout \(1\.5 must be < 1\.0\)"),
        ({"space": {"train.precision": {"type": "categorical", "choices": ["fp32", "fp8"]}}}, True,
         r"tune\.hpo\.space\.train\.precision: choice 'fp8' is not a valid train\.precision "
         r"\('fp8' is not one of fp32, bf16, fp16\)"),
        ({"space": {"model.hidden_sizes": {"type": "categorical", "choices": [[16], [0]]}}}, True,
         r"tune\.hpo\.space\.model\.hidden_sizes: choice \[0\] is not a valid model\.hidden_sizes \(0 must be >= 1\)"),
        ({"space": {"model.dropout": {"type": "float", "high": 0.5}}}, True,
         r"tune\.hpo\.space\.model\.dropout: low and high are required \(only optim\.lr takes them"),
        ({"space": {"optim.lr": {"type": "float", "log": True}}}, False,
         r"tune\.hpo\.space\.optim\.lr: without low/high it needs the LR range test "
         r"\(tune\.lr_range_test\.enabled is false\)"),
        ({"sampler": "grid", "space": {"model.dropout": FLOAT}}, True,
         r"tune\.hpo: sampler 'grid' needs every parameter of the space to be categorical"),
        ({"space": {}}, True, r"tune\.hpo: enabled=true needs a search space \(tune\.hpo\.space\)"),
        ({"space": {"model.dropout": {"type": "float", "low": 0.5, "high": 0.1}}}, True,
         r"tune\.hpo\.space\.model\.dropout\b.*: low=0\.5 must be below high=0\.1"),
        ({"space": {"train.batch_size": {"type": "int", "low": 32, "high": 32}}}, True,
         r"tune\.hpo\.space\.train\.batch_size\b.*: low=32 must be below high=32"),
        ({"space": {"optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, True,
         r"tune\.hpo\.space\.optim\.weight_decay\b.*: log=true needs low > 0, got 0"),
        ({"space": {"store.uri": {"type": "categorical", "choices": ["a", "b"]}}}, True,
         r"tune\.hpo\.space\.store\.uri: only model, optim, train, data\.loader and seed can be searched"),
        pytest.param(
            {"space": {"model.dropout": {"type": "float", "lo": 0.1, "high": 0.5}}}, True,
            r"tune\.hpo\.space\.model\.dropout\.lo: unknown key; did you mean low\?",
        ),
    ],
    ids=["unknown-path", "float-on-int", "end-rejected", "choice-rejected", "list-choice-rejected", "no-bounds",
         "lr-without-bounds-or-range-test", "grid-not-categorical", "empty-space", "low-not-below-high",
         "int-low-not-below-high", "log-with-low-0", "not-searchable", "unknown-spec-key"],
)  # fmt: skip
def test_a_bad_search_space_is_a_config_error(hpo: dict[str, Any], lr_range_test: bool, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        search_config(hpo, lr_range_test)
