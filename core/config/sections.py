"""Config sections of the training loop and its surroundings: optim, train, publish, tracking and store.
(data, model, tune and compress have modules of their own beside this one.)"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from trainflow.core.config.augment import AugmentConfig
from trainflow.core.config.base import Section
from trainflow.core.config.diagnostics import DiagnosticsConfig
from trainflow.core.config.distributed import DistributedConfig
from trainflow.core.config.finetune import FinetuneConfig
from trainflow.core.storage.s3_names import split_s3_uri


# --------------------------------------------------------------------------------------- optim
class OptimConfig(Section):
    name: Literal["adamw", "sgd", "lars", "lamb"] = Field(
        "adamw",
        description="Optimizer; weight decay is decoupled and never applied to norms or biases. lars/lamb: layer-wise trust ratios for large effective batches (see train.distributed).",
    )
    lr: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate, reached after warmup; auto = the LR range test's suggestion (tune.lr_range_test).",
    )
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay on weight matrices only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW and LAMB moment decay rates.")
    eps: float = Field(1e-8, gt=0, description="AdamW and LAMB denominator epsilon.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD and LARS momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    trust_coefficient: float = Field(
        0.001, gt=0, le=1, description="LARS trust coefficient (eta): scales each layer's ||w|| / ||g|| trust ratio."
    )
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
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        64,
        description="Micro-batch size per device; the effective batch is batch_size x grad_accum_steps x world size. auto = the largest that fits the device (doubling, then binary search, as Lightning's scale_batch_size), searched once and recorded in the store. A CUDA out-of-memory error during training splits the micro-batch and multiplies grad_accum_steps alike, so the effective batch and the update stay the same.",
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
    compile: bool = Field(
        False,
        description="torch.compile the model (inductor); if compiling fails, a warning and eager mode. Pays a compile once per process (tens of seconds), repaid on long GPU runs.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Data-parallel training on several processes or machines (DDP or FSDP) through torch's elastic launcher.",
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="Fine-tuning a model started from model.init_from: frozen modules, when they unfreeze, per-layer learning rates.",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Augmentation of each training batch on the training device, each sample with its own draw.",
    )
    diagnostics: DiagnosticsConfig = Field(
        default_factory=DiagnosticsConfig,
        description="The training doctor: per-layer statistics on a schedule and findings with a remedy.",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"'{value}' is not one of auto, cpu, cuda, cuda:N, mps")
        return value


# ---------------------------------------------------------------------------------- publish
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
        None,
        description="Also register the logged model under this name in the MLflow model registry, with the aliases below.",
    )
    alias: str = Field(
        "candidate",
        description="Registry alias set on every newly registered version (the latest candidate).",
    )
    champion_alias: str = Field(
        "champion",
        description="Registry alias of the best version so far: moved to a new version only when its champion_metric beats the current champion's by promote_margin, both scored in the same run on the new version's test split, or when there is none.",
    )
    champion_metric: str | None = Field(
        None,
        description="Test metric that decides the champion: null = accuracy (classification, higher is better) or perplexity (language modelling, lower is better); any metric of the evaluate stage (loss, perplexity and bits_per_byte: lower is better).",
    )

    promote_margin: float | None = Field(
        None,
        ge=0,
        description="How much better the new version must be to take the champion alias, so noise does not churn it: absolute points where higher is better (null = 0.005, half a point of accuracy), relative where lower is better (null = 0.01, 1% of perplexity or loss).",
    )

    @field_validator("alias", "champion_alias")
    @classmethod
    def _mlflow_alias(cls, value: str) -> str:
        """MLflow's rule, checked before anything is trained: letters, digits, _ and -; `latest` and `v<N>` are taken."""
        if not re.fullmatch(r"[\w-]{1,255}", value, flags=re.ASCII):
            raise ValueError(f"'{value}': an alias is 1 to 255 letters, digits, _ or -")
        if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"'{value}' is reserved by MLflow (latest, v<N>)")
        return value

    @model_validator(mode="after")
    def _distinct_aliases(self) -> PublishConfig:
        if self.alias == self.champion_alias:
            raise ValueError(f"alias and champion_alias are both '{self.alias}'; give them different names")
        return self


class TrackingConfig(Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set.",
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        description="MLflow experiment holding the pipeline runs; null (the default) = the config file's name (configs/digits.yaml -> digits): one experiment per config, so MLflow's compare view lines up runs of the same pipeline.",
    )
    artifact_location: str | None = Field(
        None,
        min_length=1,
        description="Artifact location given to a NEW MLflow experiment, e.g. s3://bucket/mlflow (an existing experiment keeps its own; a warning says so); null = beside an SQLite database, else the server's default. For s3:// with store.endpoint_url set, MLFLOW_S3_ENDPOINT_URL is set to it unless already set; credentials come from boto3's chain.",
    )

    @field_validator("artifact_location")
    @classmethod
    def _valid_bucket(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("s3://"):
            bucket, prefix = split_s3_uri(value)  # its ValueError names the problem
            return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        return value


class StoreConfig(Section):
    """Where artifacts live: a local folder (the default) or `s3://bucket/prefix` through boto3.

    The S3 fields apply to s3:// stores only. Credentials never go here: boto3's standard chain
    (environment, AWS_PROFILE and ~/.aws, instance or container role) supplies them."""

    uri: str = Field(
        "./artifacts",
        min_length=1,
        description="Artifact store (prepared data, checkpoints, published models): a local folder, or s3://bucket[/prefix] for S3 or an S3-compatible server.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint as http(s)://host[:port] (MinIO, Ceph, a local test server); null = AWS's own endpoint for the region.",
    )
    region: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+$",
        description="Region of the bucket (e.g. eu-west-1); null = boto3's chain (AWS_DEFAULT_REGION, ~/.aws/config).",
    )
    cache_dir: str = Field(
        "./.trainflow-cache",
        min_length=1,
        description="Local folder of an s3:// store: verified downloads, stage working files and checkpoints (uploaded as they are written), fetched s3:// datasets and the HPO study (tune.hpo.storage null); relative to the working folder, like ./artifacts and mlflow.db. The stage-cache records live in the bucket.",
    )
    multipart_threshold_mb: int = Field(
        16,
        ge=5,
        le=5120,
        description="Files of at least this many MiB upload in parts of this size (S3's smallest part is 5 MiB).",
    )
    max_concurrency: int = Field(4, ge=1, le=64, description="Parts sent or fetched at once for one multipart file.")
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard",
        description="botocore retry mode for each request; adaptive also rate-limits the client when throttled.",
    )
    max_attempts: int = Field(
        5,
        ge=1,
        le=20,
        description="botocore attempts per request, the first included (a failed whole file is tried again 3 times).",
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Seconds to wait for a connection to the endpoint."
    )
    read_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Seconds to wait for the endpoint to answer or accept data before retrying."
    )
    sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="Server-side encryption of uploaded objects; null = the bucket's default."
    )
    sse_kms_key_id: str | None = Field(
        None, min_length=1, description="KMS key (id, ARN or alias) for sse: aws:kms; null = the AWS-managed key."
    )
    storage_class: Literal["STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR"] | None = Field(
        None,
        description="Storage class of uploaded objects (only instantly readable ones: artifacts are read back); null = STANDARD.",
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value.startswith("s3://"):
            bucket, prefix = split_s3_uri(value)  # its ValueError names the problem
            return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        if "://" in value and not value.startswith("file://"):
            raise ValueError(f"'{value}': only local folders and s3://bucket[/prefix] are supported as artifact store")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"'{value}': expected http(s)://host[:port]")
        if parsed.username or parsed.password:
            raise ValueError("must not carry credentials; boto3's credential chain supplies them")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kms_key_needs_kms(self) -> StoreConfig:
        if self.sse_kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError(f"sse_kms_key_id is set but sse is {self.sse!r}; set sse: aws:kms or drop the key id")
        return self
