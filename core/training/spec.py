"""What one training needs, resolved once: the model, the optimizer at a concrete learning rate, the loop,
the loader, the seed, the prepared data, and a fingerprint of the user's own model code.

The config is what a user writes (`optim.lr: auto` included); a `TrainingSpec` is what a stage, the HPO
worker, a compress fine-tune or the Trainer takes. The tuning stages decide values (`core.tuning.plan`) and
apply them here by dotted path (`with_values`), typed by the schema, never as `--set` strings. The spec is a
stage's cache key too: a factory file edited (`model_code`) re-runs training and what follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainflow.core.config import Config, FactoryModelConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.config.messages import format_validation_error
from trainflow.core.config.overrides import set_path
from trainflow.core.errors import ConfigError
from trainflow.core.models.warm_start import warm_start_of
from trainflow.core.records import PrepareDataResult, WarmStart
from trainflow.core.storage.version import model_code_version

# How long and how often the loop runs, evaluates, logs and saves: the tuning stages set their own budget for
# these, so their cache keys ignore them (training longer re-runs training, not the search).
LOOP_SETTINGS = ("max_epochs", "max_steps", "early_stopping", "checkpoint", "eval_every_steps", "log_every_steps",
                 "resume", "progress_bar")  # fmt: skip


class OptimSpec(OptimConfig):
    """The optimizer section as training takes it: the learning rate is a number (`auto` is resolved)."""

    lr: Annotated[float, Field(gt=0, le=10)] = Field(description="Peak learning rate, reached after warmup.")


class TrainingSpec(BaseModel):
    """A training, resolved; frozen, JSON-serialisable (a Prefect task input and cache key), picklable (it
    travels to launched ranks and HPO worker processes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: ModelConfig
    optim: OptimSpec
    train: TrainConfig  # batch_size: auto and device: auto are resolved where the fit starts, on its machine
    loader: LoaderConfig
    seed: int
    data: PrepareDataResult
    model_code: str | None = None  # a model.factory's code: its files' hash or `dist==version`; None for the zoo
    warm_start: WarmStart | None = None  # model.init_from resolved: a registered version and its weights' sha256
    lr_suggestion: float | None = None  # the LR range test's, when it ran: the doctor compares optim.lr with it

    @classmethod
    def of(
        cls, config: Config, data: PrepareDataResult, lr: float | None = None, lr_suggestion: float | None = None
    ) -> TrainingSpec:
        """The spec of `config`'s training on `data`, at `lr` (default: `optim.lr`, which must then be a number);
        `lr_suggestion`: the LR range test's, when it ran.

        Raises:
            ConfigError: `optim.lr` is auto and no `lr` is given (the tuning stages decide it).
        """
        lr = config.optim.lr if lr is None else lr
        if lr == "auto":
            raise ConfigError("optim.lr: 'auto' is decided by the tuning stages (core.tuning.plan); give a number")
        return cls(
            model=config.model,
            optim=OptimSpec.model_validate(config.optim.model_dump() | {"lr": lr}),
            train=config.train,
            loader=config.data.loader,
            seed=config.seed,
            data=data,
            model_code=_model_code(config.model),
            warm_start=warm_start_of(config),
            lr_suggestion=lr_suggestion,
        )

    def with_values(self, values: Mapping[str, Any]) -> TrainingSpec:
        """This spec with `values` set by dotted config path (`optim.lr`, `train.batch_size`, `model.hidden_sizes`,
        `data.loader.num_workers`, `seed`), typed and checked by the schema as a config file is.

        Raises:
            ConfigError: a path that is not a training setting, or a value the schema rejects, one line each.
        """
        raw = {"model": self.model.model_dump(), "optim": self.optim.model_dump(), "train": self.train.model_dump(),
               "data": {"loader": self.loader.model_dump()}, "seed": self.seed}  # fmt: skip
        for path, value in values.items():
            set_path(raw, tuple(path.split(".")), value)
        try:
            tuned = _Tunable.model_validate(raw)
        except ValidationError as exc:
            overridden = {tuple(path.split(".")) for path in values}
            raise ConfigError(format_validation_error(exc, _Tunable, "tuning", overridden, "tuning")) from None
        model_code = _model_code(tuned.model) if tuned.model != self.model else self.model_code
        update = {"model": tuned.model, "optim": tuned.optim, "train": tuned.train, "loader": tuned.data.loader,
                  "seed": tuned.seed, "model_code": model_code}  # fmt: skip
        return self.model_copy(update=update)

    def with_model(self, model: ModelConfig) -> TrainingSpec:
        """The same training of another model (a distillation student): from its own init, every parameter trained
        (`train.finetune` names the first model's modules)."""
        train = self.train.model_copy(update={"finetune": type(self.train.finetune)()})
        return self.model_copy(update={"model": model, "model_code": _model_code(model), "warm_start": None,
                                       "train": train})  # fmt: skip

    def for_tuning(self) -> TrainingSpec:
        """The loop settings at their defaults (`LOOP_SETTINGS`): what the tuning stages' results depend on. The
        doctor's settings too, unless it watches the search (`train.diagnostics.in_search`)."""
        defaults = TrainConfig()
        names = LOOP_SETTINGS + (() if self.train.diagnostics.in_search else ("diagnostics",))
        return self.model_copy(update={"train": self.train.model_copy(
            update={name: getattr(defaults, name) for name in names})})  # fmt: skip

    def sections(self) -> dict[str, Any]:
        """model, optim, train, loader and seed as plain data: logged as params, kept in checkpoints."""
        return self.model_dump(
            mode="json", include={"model", "optim", "train", "loader", "seed", "model_code", "warm_start"}
        )


class _Loader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    loader: LoaderConfig


class _Tunable(BaseModel):
    """The training settings by their config paths, validated as the config validates them."""

    model_config = ConfigDict(extra="forbid")
    model: ModelConfig
    optim: OptimSpec
    train: TrainConfig
    data: _Loader
    seed: int = Field(ge=0)


def _model_code(model: ModelConfig) -> str | None:
    return model_code_version(model.factory) if isinstance(model, FactoryModelConfig) else None
