"""Config sections of the training loop and its surroundings: optim, train, evaluate, publish,
tracking and store. (data, model and tune have modules of their own beside this one.)"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from core.config.base import Section


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
