"""The train stage: build model, optimizer, schedule and loaders from config, then fit with
tracking, early stopping, checkpointing and a progress bar; resume from the last checkpoint of
an interrupted run of the same config.

Builds on core/training/: run.py (callback stack, resume, fit in a store folder), builder.py
(config -> Trainer), trainer.py (the loop and its step), callbacks.py (tracking, early stopping,
progress), checkpoint.py (save, resume, best weights).
"""

from __future__ import annotations

from collections.abc import Sequence

from trainflow.core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.records import PrepareDataResult, TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.callbacks import Callback, MetricLogger
from trainflow.core.training.run import fit_in_folder
from trainflow.core.training.state import StopReason


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
    done = fit_in_folder(
        model_cfg, optim_cfg, train_cfg, loader_cfg, seed, data, store, store_key, logger, run_id, callbacks
    )
    fit = done.fit
    return TrainResult(
        epochs_run=fit.epochs_run,
        steps=fit.steps,
        stopped_early=fit.stop_reason is StopReason.EARLY_STOPPING,
        stop_reason=fit.stop_reason.value,
        stop_message=fit.stop_message,
        best_val_loss=done.best_metrics.get("val/loss", float("nan")),
        best_step=done.best_step,
        best_metrics=done.best_metrics,
        samples_per_s=fit.samples_per_s,
        effective_batch_size=done.facts["effective_batch_size"],
        micro_batch_size=done.facts["micro_batch_size"],
        world_size=done.facts["world_size"],
        nonfinite_steps=fit.nonfinite_steps,
        n_parameters=done.facts["n_parameters"],
        resumed_from_step=done.resumed_from,
        checkpoint_uri=done.weights_uri,
        mlflow_run_id=run_id,
    )
