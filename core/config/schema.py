"""The config's root: one YAML file validated into typed, documented sections.

Every field carries its meaning in `description`; `trainflow validate CONFIG` checks a file without
touching anything else. Sections live beside this module: data (`data.py`), model (`model.py`), tune
(`tune.py`), compress (`compress.py`), and optim, train, publish, tracking, store (`sections.py`). Problems are
reported one line each, by YAML path (`messages.py`); `--set` overrides are parsed in `overrides.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

import trainflow.core.config.sections as sections
from trainflow.core.config.base import Section
from trainflow.core.config.compress import CompressConfig
from trainflow.core.config.data import DataConfig, planned_task
from trainflow.core.config.messages import format_validation_error
from trainflow.core.config.model import CNNConfig, ModelConfig
from trainflow.core.config.overrides import parse_override, set_path
from trainflow.core.config.secrets import hide_in
from trainflow.core.config.timeouts import TimeoutsConfig
from trainflow.core.config.tune import TuneConfig, search_space_problems
from trainflow.core.data.spec import check_test_metric
from trainflow.core.errors import ConfigError


# -------------------------------------------------------------------------------------- config
class Config(Section):
    seed: int = Field(0, ge=0, description="Seeds the data split, initialisation, shuffling and dropout.")
    data: DataConfig = Field(
        description="Where the data comes from and how it is split; required (a config that names no data is a mistake, not a request for the demo)."
    )
    model: ModelConfig = Field(default_factory=CNNConfig, description="Which network to train.")
    optim: sections.OptimConfig = Field(default_factory=sections.OptimConfig, description="Optimizer and LR schedule.")
    train: sections.TrainConfig = Field(default_factory=sections.TrainConfig, description="The training loop.")
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="Tuning stages before training: LR range test, hyperparameter search."
    )
    compress: CompressConfig = Field(
        default_factory=CompressConfig,
        description="Compressed variants of the trained model (pruned, quantized, distilled), each evaluated like the original; the recommended one is published beside it.",
    )
    publish: sections.PublishConfig = Field(
        default_factory=sections.PublishConfig, description="What is published and where."
    )
    tracking: sections.TrackingConfig = Field(default_factory=sections.TrackingConfig, description="MLflow tracking.")
    store: sections.StoreConfig = Field(default_factory=sections.StoreConfig, description="Artifact store.")
    timeouts: TimeoutsConfig = Field(
        default_factory=TimeoutsConfig, description="Per-stage time limits in seconds (none by default)."
    )

    def sha256(self) -> str:
        """Content hash of the resolved config (stable across key order and formatting)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def with_values(self, values: Mapping[str, Any], source: str = "tuning") -> Config:
        """This config with `values` set by dotted path (`optim.lr`, `model.hidden_sizes`), typed and checked
        by the schema: how the tuning stages' values become the config a run publishes.

        Raises:
            ConfigError: a value the schema rejects, named by its path and `source`.
        """
        if not values:
            return self
        raw = self.model_dump()
        for path, value in values.items():
            set_path(raw, tuple(path.split(".")), value)
        try:
            return Config.model_validate(raw)
        except ValidationError as exc:
            overridden = {tuple(path.split(".")) for path in values}
            raise ConfigError(format_validation_error(exc, Config, source, overridden, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `section.key=value` overrides and validate.

    Raises:
        ConfigError: listing every problem, one line each, prefixed by the file name or `--set`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least a data section (see configs/)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error instead of last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def config_from_dict(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    source: str = "config",
    override_source: str = "--set",
) -> Config:
    """Validate an already-parsed config mapping (see `load_config`); `override_source` names who set
    the overrides in messages (`--set` from the CLI, `tuning` from the tuning stages)."""
    raw = json.loads(json.dumps(raw, default=str))  # deep copy; YAML dates and the like become strings
    overridden: set[tuple[str, ...]] = set()
    problems = []
    for item in overrides:
        try:
            keys, value = parse_override(item)
            set_path(raw, keys, value)
            overridden.add(keys)
        except ValueError as exc:
            problems.append(f"{override_source} {item}: {exc}")
    if "evaluate" in raw:  # retired: its speed settings were a second harness
        problems.append(f"{source}: evaluate: this section is gone; the trained model's latency and throughput are "
                        "measured as the compress table's fp32 row, with compress.measure (threads, warmup, "
                        "latency_calls, rounds, serving_batch, throughput_calls)")  # fmt: skip
    if problems:
        raise ConfigError(problems)
    raw = hide_in(raw)  # a literal URL password becomes a reference: what is hashed, logged and stored
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Config, source, overridden, override_source)) from None
    problems = _tuning_problems(config) + _publish_problems(config)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return config


def _tuning_problems(config: Config) -> list[str]:
    """Checks across sections: who provides an `auto` LR, and every value the search space may draw."""
    problems = []
    lr_range_test_allowed = config.tune.lr_range_test.enabled is not False
    searched_lr = config.tune.hpo.enabled and "optim.lr" in config.tune.hpo.space
    if config.optim.lr == "auto" and not lr_range_test_allowed and not searched_lr:
        problems.append(
            "optim.lr: 'auto' needs the LR range test, but tune.lr_range_test.enabled is false; set a number"
        )
    if config.tune.hpo.enabled:
        raw = config.model_dump(mode="json", exclude={"tune"})
        problems += search_space_problems(raw, config.tune.hpo.space, lr_range_test_allowed, _problems_with)
    return problems


def _publish_problems(config: Config) -> list[str]:
    """publish.champion_metric names a test metric of the task the data is prepared for (checked here, not
    after training)."""
    if config.publish.champion_metric is None:
        return []
    try:
        check_test_metric(config.publish.champion_metric, planned_task(config.data), "publish.champion_metric")
    except ConfigError as exc:
        return exc.problems
    return []


def _problems_with(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    try:
        config_from_dict(raw, overrides)
    except ConfigError as exc:
        return exc.problems
    return []
