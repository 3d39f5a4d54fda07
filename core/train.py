"""The train stage: build model, optimizer, schedule and loaders from config, then fit with
tracking, early stopping, checkpointing and a progress bar; resume from the last checkpoint of
an interrupted run of the same config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from core.data.loaders import build_loaders
from core.errors import ConfigError
from core.models import build_model
from core.prepare_data import PrepareDataResult, load_splits
from core.records import StageResult
from core.store import ArtifactStore
from core.training.callbacks import Callback, EarlyStopping, MetricLogger, ProgressBar, StopReason, TrackingCallback
from core.training.checkpoint import (
    BEST,
    FINAL,
    ModelCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    periodic_checkpoints,
)
from core.training.metrics import metric_names
from core.training.optim import build_optimizer, build_scheduler
from core.training.precision import resolve_device
from core.training.seed import seed_everything
from core.training.trainer import Trainer

log = logging.getLogger(__name__)


class TrainResult(StageResult):
    epochs_run: int
    steps: int
    stopped_early: bool
    stop_reason: str
    stop_message: str
    best_val_loss: float
    best_step: int | None
    best_metrics: dict[str, float]
    samples_per_s: float
    effective_batch_size: int
    nonfinite_steps: int
    n_parameters: int
    resumed_from_step: int | None
    checkpoint_uri: str  # the weights handed on: the best evaluation's when restore_best is on
    mlflow_run_id: str | None

    def artifact_uris(self) -> list[str]:
        return [self.checkpoint_uri]


def build_trainer(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    store: ArtifactStore,
    callbacks: Sequence[Callback] = (),
    lr: float | None = None,
) -> Trainer:
    """Seeded model, optimizer (at `lr` if given, else `optim.lr`), LR schedule and loaders in a Trainer.

    Shared by training, the LR range test and HPO trials, so all three train the same way.

    Raises:
        ConfigError: a setting does not fit this data or machine (before any compute).
    """
    device = resolve_device(train_cfg.device)
    check_metric(train_cfg.early_stopping.monitor, data.spec.task, "train.early_stopping.monitor")
    seed_everything(seed)
    seq_len = data.spec.input_shape[0] if data.spec.task == "language_modeling" else None
    pin = loader_cfg.pin_memory and device.type == "cuda"
    loaders = build_loaders(load_splits(data, store), seq_len, train_cfg.batch_size, loader_cfg, seed, pin)
    model = build_model(model_cfg, data.spec).to(device)
    optimizer = build_optimizer(model, optim_cfg, lr)
    steps_per_epoch = -(-len(loaders.train) // train_cfg.grad_accum_steps)
    total_steps = min(train_cfg.max_steps or 2**62, train_cfg.max_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
    return Trainer(model, optimizer, scheduler, loaders, train_cfg, device, data.spec.task, callbacks)


def check_metric(metric: str, task: str, field: str) -> None:
    """A ConfigError naming `field` unless `metric` is one the validation pass produces for `task`."""
    available = metric_names(task)
    if metric not in available:
        raise ConfigError(
            f"{field}: '{metric}' is not an evaluation metric of {task}; available: {', '.join(available)}"
        )


def train(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    store: ArtifactStore,
    store_key: str,
    logger: MetricLogger | None = None,
    run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a model on prepared data; checkpoints and weights go to `<store>/<store_key>/`.

    Raises:
        ConfigError: a setting does not fit this data or machine (checked before any training step).
        TrainingError: training diverged, or the checkpoint to resume from cannot be loaded.
    """
    folder = store.workdir(store_key)
    sections = {"model": model_cfg, "optim": optim_cfg, "train": train_cfg, "loader": loader_cfg}
    config = {name: section.model_dump(mode="json") for name, section in sections.items()} | {"seed": seed}
    checkpoint = ModelCheckpoint(
        folder, train_cfg.checkpoint, train_cfg.early_stopping, {"config": config, "run_id": run_id}
    )
    stack: list[Callback] = [TrackingCallback(logger)] if logger else []
    stack += [EarlyStopping(train_cfg.early_stopping)] if train_cfg.early_stopping.enabled else []
    stack += [checkpoint, ProgressBar(train_cfg.progress_bar), *callbacks]
    trainer = build_trainer(model_cfg, optim_cfg, train_cfg, loader_cfg, seed, data, store, stack)

    resumed_from = _resume(trainer, folder, train_cfg.resume, config)
    fit = trainer.fit()
    return TrainResult(
        epochs_run=fit.epochs_run,
        steps=fit.steps,
        stopped_early=fit.stop_reason is StopReason.EARLY_STOPPING,
        stop_reason=fit.stop_reason.value,
        stop_message=fit.stop_message,
        best_val_loss=checkpoint.best_metrics.get("val/loss", float("nan")),
        best_step=checkpoint.best_step,
        best_metrics=checkpoint.best_metrics,
        samples_per_s=fit.samples_per_s,
        effective_batch_size=trainer.describe()["effective_batch_size"],
        nonfinite_steps=fit.nonfinite_steps,
        n_parameters=sum(p.numel() for p in trainer.model.parameters()),
        resumed_from_step=resumed_from,
        checkpoint_uri=store.put_file(folder / FINAL, f"{store_key}/{FINAL}"),
        mlflow_run_id=run_id,
    )


def _resume(trainer: Trainer, folder: Path, resume: bool, config: dict[str, Any]) -> int | None:
    """Restore the last checkpoint (resume on), or clear old ones so they cannot mix with a fresh run."""
    latest = latest_checkpoint(folder)
    if latest is None:
        return None
    if not resume:
        for path in [*periodic_checkpoints(folder), folder / BEST, folder / FINAL]:
            path.unlink(missing_ok=True)
        log.info("train.resume=false: starting over, old checkpoints in %s removed", folder)
        return None
    payload = load_checkpoint(latest)
    for key, saved, current in _differences(payload.get("config", {}), config):
        log.info("resume: %s is %r in the checkpoint and %r in the config; the config value wins", key, saved, current)
    trainer.restore(payload)
    state = trainer.state
    log.info(
        "resuming from %s: epoch %d, batch %d, step %d", latest.name, state.epoch, state.batch_in_epoch, state.step
    )
    return state.step


def _differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]
