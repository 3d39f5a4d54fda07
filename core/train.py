"""The train stage: build model, optimizer, schedule and loaders from config, then fit with
tracking, early stopping, checkpointing and a progress bar; resume from the last checkpoint of
an interrupted run of the same config.

Builds on core/training/: builder.py (config -> Trainer), trainer.py (the loop and its step),
callbacks.py (tracking, early stopping, progress), checkpoint.py (save, resume, best weights).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from core.records import PrepareDataResult, TrainResult
from core.storage.store import ArtifactStore
from core.training.builder import build_trainer
from core.training.callbacks import Callback, EarlyStopping, MetricLogger, ProgressBar, TrackingCallback
from core.training.checkpoint import (
    BEST,
    FINAL,
    ModelCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    periodic_checkpoints,
)
from core.training.state import StopReason
from core.training.trainer import Trainer

log = logging.getLogger(__name__)


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
