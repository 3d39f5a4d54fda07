"""Config of the tuning stages: `tune.lr_range_test` and `tune.hpo` (with its search space)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from trainflow.core.config.base import Section


class LRRangeTestConfig(Section):
    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="Run the LR range test (Smith 2017) before training: auto = only when its suggestion is used (optim.lr: auto, or tune.hpo.space.optim.lr without bounds, which then spans suggestion/10 .. x3); true = always (its curve is logged even when unused); false = never.",
    )
    min_lr: float = Field(1e-6, gt=0, description="First learning rate of the sweep.")
    max_lr: float = Field(
        1.0, gt=0, le=10, description="Last learning rate of the sweep (it stops earlier when the loss diverges)."
    )
    num_steps: int = Field(
        100,
        ge=20,
        description="Optimizer steps of the sweep; the LR grows exponentially from min_lr to max_lr over them.",
    )
    smoothing: float = Field(
        0.98,
        ge=0,
        lt=1,
        description="Weight of the past in the exponential moving average of the loss (bias-corrected).",
    )
    diverge_factor: float = Field(
        4.0, gt=1, description="Stop once the smoothed loss exceeds this multiple of the best seen."
    )
    rule: Literal["valley", "steepest", "min_div_10"] = Field(
        "steepest",
        description="How the LR is picked from the curve: steepest (largest negative slope against log LR, as Lightning's lr_find; the default: nearest the grid optimum in benchmarks/lr_range_test.py), min_div_10 (a tenth of the LR at the lowest loss), valley (as fastai: the middle of the longest descent; depends on min_lr).",
    )
    skip_start: int = Field(
        10,
        ge=0,
        description="Points ignored at the start of the curve, where the average is still warming up and early spikes live.",
    )
    skip_end: int = Field(
        5, ge=0, description="Points ignored at the end of the curve, where the loss has started to diverge."
    )

    @model_validator(mode="after")
    def _range(self) -> LRRangeTestConfig:
        if self.min_lr >= self.max_lr:
            raise ValueError(f"min_lr={self.min_lr:g} must be below max_lr={self.max_lr:g}")
        if self.skip_start + self.skip_end + 10 > self.num_steps:
            raise ValueError(f"skip_start + skip_end + 10 must not exceed num_steps={self.num_steps}")
        return self


class FloatParam(Section):
    type: Literal["float"] = Field(description="A real number in [low, high].")
    low: float | None = Field(
        None, description="Lower bound; for optim.lr it may be left out to take suggestion/10 from the LR range test."
    )
    high: float | None = Field(
        None, description="Upper bound; for optim.lr it may be left out to take suggestion*3 from the LR range test."
    )
    log: bool = Field(False, description="Sample uniformly in log space (learning rates, weight decay).")
    step: float | None = Field(None, gt=0, description="Discretisation step (not with log).")

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low={self.low:g} must be below high={self.high:g}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("step and log=true cannot be combined")
        return self


class IntParam(Section):
    type: Literal["int"] = Field(description="An integer in [low, high].")
    low: int = Field(description="Lower bound (inclusive).")
    high: int = Field(description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample uniformly in log space.")
    step: int = Field(1, ge=1, description="Step between values.")

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        if self.low >= self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got {self.low}")
        return self


class CategoricalParam(Section):
    type: Literal["categorical"] = Field(description="One of a list of values.")
    choices: list[Any] = Field(min_length=1, description="The values to choose from (numbers, strings, lists).")


ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class HPOConfig(Section):
    enabled: bool = Field(
        False,
        description="Run a hyperparameter search (Optuna) before training; its best parameters are merged into the training config.",
    )
    space: dict[str, ParamSpec] = Field(
        default_factory=dict,
        description="Search space: dotted config paths (optim.lr, train.batch_size, model.dropout, ...) to a float, int or categorical range.",
    )
    n_trials: int = Field(
        20,
        ge=1,
        description="Trials in the study, pruned and failed ones included (a trial re-queued after its worker died counts once); a re-run continues until the study holds this many. Workers that start a trial at the same moment can add up to workers - 1 more, counting every worker process on every machine.",
    )
    parallelism: int = Field(
        1,
        ge=1,
        description="Trials run at once on this machine, each in its own worker process with cores/parallelism torch threads.",
    )
    sampler: Literal["tpe", "gp", "random", "grid"] = Field(
        "tpe", description="Optuna sampler: tpe, gp (Gaussian process), random, or grid (categorical parameters only)."
    )
    pruner: Literal["hyperband", "median", "none"] = Field(
        "hyperband",
        description="Optuna pruner stopping unpromising trials at an epoch's evaluation: hyperband (successive halving over brackets of budgets; the default, as good as no pruning in half the time in benchmarks/hpo.py), median (prunes below the median of earlier trials at the same evaluation), none.",
    )
    pruner_startup_trials: int = Field(
        5,
        ge=0,
        description="median: trials that run their full budget before any is pruned (the reference the median is taken over).",
    )
    pruner_warmup_evals: int = Field(
        2,
        ge=0,
        description="median: evaluations a trial always gets before it can be pruned; early in a trial's schedule a high LR looks worst and often ends best.",
    )
    max_epochs_per_trial: int = Field(5, ge=1, description="Epochs of each trial's training run.")
    max_steps_per_trial: int | None = Field(
        None, ge=1, description="Optimizer steps of each trial, if fewer than max_epochs_per_trial gives."
    )
    metric: str = Field(
        "val/loss", description="Validation metric optimised: val/loss, val/accuracy or val/perplexity."
    )
    direction: Literal["minimize", "maximize"] = Field(
        "minimize", description="Whether the metric is minimised or maximised."
    )
    seed: int | None = Field(None, ge=0, description="Sampler seed; null = the config's seed.")
    storage: str | None = Field(
        None,
        description="Optuna RDB URL (sqlite:///..., postgresql://...); null = sqlite file in the store. Workers elsewhere join a study through the same URL and study_name.",
    )
    study_name: str | None = Field(
        None,
        min_length=1,
        description="Study name; null = derived from the config, so re-running the same config continues its study.",
    )
    timeout_s: float | None = Field(None, gt=0, description="Stop starting new trials after this many seconds.")
    heartbeat_interval_s: int = Field(
        10, ge=1, description="With a shared storage: seconds between a running trial's heartbeats to the database."
    )
    grace_period_s: int = Field(
        60,
        ge=2,
        description="With a shared storage: a running trial whose heartbeat is older than this is failed (its worker died) and its parameters re-queued; keep it well above heartbeat_interval_s.",
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="With a shared storage: how often a dead worker's trial is re-queued before it stays failed.",
    )

    @model_validator(mode="after")
    def _space_fits_sampler(self) -> HPOConfig:
        if self.enabled and not self.space:
            raise ValueError("enabled=true needs a search space (tune.hpo.space)")
        if self.sampler == "grid" and any(not isinstance(p, CategoricalParam) for p in self.space.values()):
            raise ValueError("sampler 'grid' needs every parameter of the space to be categorical")
        if self.grace_period_s <= self.heartbeat_interval_s:
            raise ValueError("grace_period_s must be longer than heartbeat_interval_s (a live trial would be failed)")
        return self


class TuneConfig(Section):
    lr_range_test: LRRangeTestConfig = Field(default_factory=LRRangeTestConfig, description="LR range test stage.")
    hpo: HPOConfig = Field(default_factory=HPOConfig, description="Hyperparameter search stage.")


def search_space_problems(
    raw: dict[str, Any],
    space: dict[str, ParamSpec],
    lr_range_test_allowed: bool,
    validate: Callable[[dict[str, Any], list[str]], list[str]],
) -> list[str]:
    """Problems of the search space found by validating the config with each range end and choice.

    `validate(raw, overrides)` returns the problems of `raw` with `path=value` overrides applied, so
    every value a trial may draw is checked by the same schema as a hand-written config.
    """
    problems = []
    for path, spec in space.items():
        where = f"tune.hpo.space.{path}"
        section = path.split(".")[0]
        if section not in ("model", "optim", "train", "seed", "data"):
            problems.append(f"{where}: only model, optim, train, data.loader and seed can be searched")
            continue
        if section == "data" and not path.startswith("data.loader."):
            problems.append(f"{where}: the data is prepared once, before the search; of data, only data.loader "
                            "can be searched")  # fmt: skip
            continue
        if isinstance(spec, FloatParam) and (spec.low is None or spec.high is None):
            if path != "optim.lr":
                problems.append(f"{where}: low and high are required (only optim.lr takes them from the LR range test)")
            elif not lr_range_test_allowed:
                problems.append(
                    f"{where}: without low/high it needs the LR range test (tune.lr_range_test.enabled is false)"
                )
        for label, value in _probes(spec):
            found = validate(raw, [f"{path}={_yaml(value)}"])
            if found:
                problem = found[0].split(": ", 2)[-1]
                if "unknown key" in problem:
                    problems.append(f"{where}: not a config key ({problem})")
                    break
                problems.append(f"{where}: {label} {value!r} is not a valid {path} ({problem})")
    return problems


def _probes(spec: ParamSpec) -> list[tuple[str, Any]]:
    """Values a trial may draw that the schema must accept."""
    if isinstance(spec, CategoricalParam):
        return [("choice", choice) for choice in spec.choices]
    probes: list[tuple[str, Any]] = [(name, v) for name, v in (("low", spec.low), ("high", spec.high)) if v is not None]
    if isinstance(spec, FloatParam) and spec.low is not None and spec.high is not None and spec.step is None:
        middle = math.exp((math.log(spec.low) + math.log(spec.high)) / 2) if spec.log else (spec.low + spec.high) / 2
        probes.append(("an inner value such as", middle + (spec.high - spec.low) * 1e-3))  # not an integer
    return probes


def _yaml(value: Any) -> str:
    import json

    return json.dumps(value)
