"""The pipeline's config: one YAML file validated into typed, documented sections.

Every field carries its meaning in `description`; `trainflow validate CONFIG` checks a file
without touching anything else. Sections: data, model, optim, train, evaluate, tracking,
store, publish (later stages add theirs).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from core.config_base import Section
from core.config_errors import format_validation_error, parse_override
from core.errors import ConfigError
from core.tune_config import TuneConfig, search_space_problems


# ---------------------------------------------------------------------------------------- data
class LoaderConfig(Section):
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes; 0 loads batches in the main process, fastest for in-memory data.",
    )
    pin_memory: bool = Field(
        False, description="Page-lock host batches so host-to-GPU copies can overlap compute; no effect on CPU."
    )
    persistent_workers: bool = Field(False, description="Keep workers alive between epochs (needs num_workers > 0).")
    prefetch_factor: int | None = Field(
        None, ge=1, description="Batches each worker loads ahead (needs num_workers > 0); null = torch's default of 2."
    )

    @model_validator(mode="after")
    def _workers_needed(self) -> LoaderConfig:
        if self.num_workers == 0 and self.persistent_workers:
            raise ValueError("persistent_workers=true needs num_workers > 0")
        if self.num_workers == 0 and self.prefetch_factor is not None:
            raise ValueError("prefetch_factor needs num_workers > 0")
        return self


class _DataCommon(Section):
    val_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of the data held out for validation (early stopping, model selection)."
    )
    test_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of the data held out for the final evaluation only."
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="torch DataLoader settings.")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> _DataCommon:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} must be < 0.9")
        return self


class SklearnDataConfig(_DataCommon):
    source: Literal["sklearn"] = Field("sklearn", description="A dataset bundled with scikit-learn (no download).")
    name: Literal["digits", "wine", "breast_cancer", "iris"] = Field(
        "digits", description="Which bundled dataset; digits is 8x8 images, the others tabular."
    )
    scale: Literal["standard", "none"] = Field(
        "standard", description="Standardise features with statistics fitted on the training split only."
    )


class TableDataConfig(_DataCommon):
    source: Literal["csv", "parquet"] = Field(description="A local table file with one row per sample.")
    path: str = Field(description="Path of the .csv or .parquet file.")
    target: str = Field(description="Column holding the class label; every other column is a feature.")
    scale: Literal["standard", "none"] = Field(
        "standard",
        description="Standardise numeric columns with statistics fitted on the training split only; categorical columns are one-hot encoded, NaNs imputed.",
    )


class TextDataConfig(_DataCommon):
    source: Literal["text"] = Field(
        description="A UTF-8 text file, modelled as a sequence of bytes (vocabulary of 256)."
    )
    path: str | None = Field(
        None, description="Path of the text file; null = the Python standard library's pydoc_data.topics text (466 KB)."
    )
    seq_len: int = Field(64, ge=2, description="Context length in bytes of each training window.")


class SyntheticDataConfig(_DataCommon):
    source: Literal["synthetic"] = Field(
        description="A generated classification problem (scikit-learn make_classification), sized for scale tests."
    )
    n_samples: int = Field(2000, ge=20, description="Number of samples to generate.")
    n_features: int = Field(20, ge=2, description="Number of features; a quarter of them (at least 2) carry signal.")
    n_classes: int = Field(2, ge=2, description="Number of classes.")
    class_sep: float = Field(1.0, gt=0, description="Distance between class clusters; smaller is harder.")
    scale: Literal["standard", "none"] = Field(
        "standard", description="Standardise features with statistics fitted on the training split only."
    )


def _data_source(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("source", "sklearn"))
    return getattr(value, "source", "sklearn")


DataConfig = Annotated[
    Annotated[SklearnDataConfig, Tag("sklearn")]
    | Annotated[TableDataConfig, Tag("csv")]
    | Annotated[TableDataConfig, Tag("parquet")]
    | Annotated[TextDataConfig, Tag("text")]
    | Annotated[SyntheticDataConfig, Tag("synthetic")],
    Discriminator(_data_source),
]


# --------------------------------------------------------------------------------------- model
class MLPConfig(Section):
    name: Literal["mlp"] = Field("mlp", description="Multi-layer perceptron for tabular features.")
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [128, 128], min_length=1, description="Width of each hidden layer."
    )
    activation: Literal["relu", "gelu", "silu"] = Field("gelu", description="Non-linearity between layers.")
    norm: Literal["none", "layernorm", "batchnorm"] = Field(
        "layernorm", description="Normalisation after each hidden linear layer."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout probability after each hidden layer.")


class CNNConfig(Section):
    name: Literal["cnn"] = Field("cnn", description="Small ResNet-style convolutional network for images.")
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        [32, 64],
        min_length=1,
        description="Channels of each residual stage; every stage after the first halves the spatial size.",
    )
    blocks_per_stage: int = Field(1, ge=1, description="Residual blocks (two 3x3 convolutions each) per stage.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier head.")


class GPTConfig(Section):
    name: Literal["gpt"] = Field("gpt", description="Decoder-only transformer for language modelling.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(128, ge=8, description="Embedding (residual stream) width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings, attention and MLP outputs.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Pre-norm type in each block.")
    mlp: Literal["gelu", "swiglu"] = Field(
        "gelu", description="Feed-forward type: GELU (4x width) or SwiGLU (8/3x width, as LLaMA)."
    )
    bias: bool = Field(False, description="Bias terms in linear layers and norms.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, about a third more compute."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        return self


class FactoryModelConfig(Section):
    name: Literal["factory"] = Field("factory", description="A model built by your own function.")
    factory: str = Field(
        description="'package.module:function' called as function(spec, **params) where spec describes the data (input_shape, n_classes, vocab_size, seq_len)."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the factory.")

    @field_validator("factory")
    @classmethod
    def _dotted_path(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"'{value}' is not of the form 'package.module:function'")
        return value


def _model_name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", "factory" if "factory" in value else "cnn"))
    return getattr(value, "name", "cnn")


ModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")]
    | Annotated[CNNConfig, Tag("cnn")]
    | Annotated[GPTConfig, Tag("gpt")]
    | Annotated[FactoryModelConfig, Tag("factory")],
    Discriminator(_model_name),
]


# --------------------------------------------------------------------------------------- optim
class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = Field(
        "adamw", description="Optimizer; weight decay is decoupled and never applied to norms or biases."
    )
    lr: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate, reached after warmup; auto = the LR range test's suggestion (tune.lr_range_test).",
    )
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay on weight matrices only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW moment decay rates.")
    eps: float = Field(1e-8, gt=0, description="AdamW denominator epsilon.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR decay after warmup, down to min_lr_ratio * lr at the last step."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to lr.")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final LR as a fraction of lr (cosine and linear schedules)."
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each be in [0, 1)")
        return self


# --------------------------------------------------------------------------------------- train
class EarlyStoppingConfig(Section):
    enabled: bool = Field(True, description="Stop when the monitored metric stops improving.")
    monitor: str = Field("val/loss", description="Metric to watch: val/loss, or a task metric such as val/accuracy.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower (min) or higher (max) is better.")
    patience: int = Field(5, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")
    restore_best: bool = Field(True, description="At the end, load the weights of the best evaluation.")


class CheckpointConfig(Section):
    every_steps: int | None = Field(
        None,
        ge=1,
        description="Save every this many optimizer steps; null = at evaluations, at most once per min_interval_s.",
    )
    min_interval_s: float = Field(
        60.0,
        ge=0,
        description="With every_steps null: seconds between checkpoints at evaluations (0 = every evaluation). A crash loses at most about this much training; short epochs do not each pay a save. The last state is always saved at the end.",
    )
    keep_last: int = Field(2, ge=1, description="Periodic checkpoints kept on disk; the best one is always kept.")


class TrainConfig(Section):
    max_epochs: int = Field(20, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps, if sooner than max_epochs."
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Micro-batch size per device; the effective batch is batch_size x grad_accum_steps x world size.",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches accumulated per optimizer step; each is weighted by its share of the step's samples, so a short last batch stays exact.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype: bf16 on CPU or GPU, fp16 on CUDA only (with a gradient scaler), fp32 off."
    )
    grad_clip_norm: float | None = Field(
        1.0,
        gt=0,
        description="Clip the global gradient norm to this value; null = no clipping (the norm is still logged).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps; auto picks cuda when available, else cpu.")
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate on the validation split every this many optimizer steps; null = at the end of each epoch.",
    )
    log_every_steps: int = Field(
        25,
        ge=1,
        description="Log training metrics every this many optimizer steps (the only points where the device is synchronised for logging).",
    )
    max_nonfinite_steps: int = Field(
        5,
        ge=1,
        description="Skip optimizer steps whose gradient norm is NaN/Inf; stop with an error after this many in a row.",
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Early stopping on a validation metric."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Periodic checkpoints used for resume."
    )
    resume: bool = Field(
        True, description="Continue from the last checkpoint of an interrupted run of the same config."
    )
    progress_bar: bool = Field(True, description="Show a progress bar when stderr is a terminal.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"'{value}' is not one of auto, cpu, cuda, cuda:N, mps")
        return value


# ---------------------------------------------------------------------------- evaluate, publish
class EvaluateConfig(Section):
    latency_warmup: int = Field(5, ge=0, description="Untimed batch-1 calls before measuring latency.")
    latency_iters: int = Field(50, ge=5, description="Timed batch-1 calls; p50 and p95 are reported.")
    throughput_batches: int = Field(10, ge=1, description="Timed calls at the training batch size for throughput.")


class PublishConfig(Section):
    name: str = Field(
        "model",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Published under <store>/published/<name>/; also the MLflow model name.",
    )
    log_mlflow_model: bool = Field(
        True, description="Log the model to MLflow (mlflow.pytorch.log_model) with signature and input example."
    )
    registered_model_name: str | None = Field(
        None, description="Also register the logged model under this name in the MLflow model registry."
    )


class TrackingConfig(Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set.",
    )
    experiment: str = Field("trainflow", min_length=1, description="MLflow experiment holding the pipeline runs.")


class StoreConfig(Section):
    uri: str = Field(
        "./artifacts",
        min_length=1,
        description="Artifact store: a local folder (prepared data, checkpoints, published models, stage cache).",
    )

    @field_validator("uri")
    @classmethod
    def _local_only_for_now(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(f"'{value}': only local folders are supported as artifact store")
        return value


# -------------------------------------------------------------------------------------- config
class Config(Section):
    seed: int = Field(0, ge=0, description="Seeds the data split, initialisation, shuffling and dropout.")
    data: DataConfig = Field(
        default_factory=SklearnDataConfig, description="Where the data comes from and how it is split."
    )
    model: ModelConfig = Field(default_factory=CNNConfig, description="Which network to train.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and LR schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="Test-set evaluation and speed measurements."
    )
    tune: TuneConfig = Field(
        default_factory=TuneConfig, description="Tuning stages before training: LR range test, hyperparameter search."
    )
    publish: PublishConfig = Field(default_factory=PublishConfig, description="What is published and where.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Artifact store.")

    def sha256(self) -> str:
        """Content hash of the resolved config (stable across key order and formatting)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


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
    raw = {} if raw is None else raw
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
            _set_path(raw, keys, value)
            overridden.add(keys)
        except ValueError as exc:
            problems.append(f"{override_source} {item}: {exc}")
    if problems:
        raise ConfigError(problems)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Config, source, overridden, override_source)) from None
    problems = _tuning_problems(config)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return config


def _tuning_problems(config: Config) -> list[str]:
    """Checks across sections: who provides an `auto` LR, and every value the search space may draw."""
    problems = []
    lr_test = config.tune.lr_range_test.enabled
    searched_lr = config.tune.hpo.enabled and "optim.lr" in config.tune.hpo.space
    if config.optim.lr == "auto" and not lr_test and not searched_lr:
        problems.append("optim.lr: 'auto' needs tune.lr_range_test.enabled: true (or a number)")
    if config.tune.hpo.enabled:
        raw = config.model_dump(mode="json", exclude={"tune"})
        problems += search_space_problems(raw, config.tune.hpo.space, lr_test, _problems_with)
    return problems


def _problems_with(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    try:
        config_from_dict(raw, overrides)
    except ConfigError as exc:
        return exc.problems
    return []


def _set_path(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(keys[: depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value
