"""One rank's fit in a store folder: the callback stack (tracking, early stopping, checkpoint, progress), resume
from the folder's latest checkpoint (`resume.py`), the fit, and the record of what it left (`TrainResult`).

With a remote store (S3), checkpoints are uploaded in the background as they are written (see checkpoint.py),
the last upload awaited before the fit returns. `fit.py` runs this in the stage's process, or `launch.py` on
every rank of a data-parallel fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainflow.core.records import TrainResult
from trainflow.core.storage.store import ArtifactStore, LocalStore
from trainflow.core.storage.uploads import BackgroundUploads
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback, EarlyStopping, MetricLogger, ProgressBar, TrackingCallback
from trainflow.core.training.checkpoint import FINAL, ModelCheckpoint
from trainflow.core.training.diagnostics import Doctor
from trainflow.core.training.distributed import SINGLE, Rank
from trainflow.core.training.interrupt import CheckpointOnSignal
from trainflow.core.training.resume import resume_checkpoint, resume_ranks
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import StopReason
from trainflow.core.training.trainer import LossFn


@dataclass(frozen=True)
class FitJob:
    """Everything a fit needs; picklable, so launched ranks receive it."""

    spec: TrainingSpec
    store: ArtifactStore
    store_key: str  # the fit's folder in the store: checkpoints, the weights handed on
    logger: MetricLogger | None = None  # the main rank's metrics go here
    run_id: str | None = None  # the MLflow run the record names
    callbacks: Sequence[Callback] = ()
    model: nn.Module | None = None  # a pre-built model (pruned, a student) instead of one built from the spec
    loss: LossFn | None = None  # the training loss (a distillation loss); default cross-entropy
    extra_config: Mapping[str, Any] | None = None  # more sections recorded in checkpoints (the compress section)


def fit_rank(job: FitJob, rank: Rank = SINGLE, device: torch.device | None = None) -> TrainResult | None:
    """The fit as one rank runs it: the main rank logs, checkpoints, writes the weights and returns the record
    (None on the other ranks); every rank resumes from the main rank's checkpoint."""
    spec, store = job.spec, job.store
    folder = store.workdir(job.store_key)
    config = spec.sections() | dict(job.extra_config or {})  # kept in checkpoints: resume says what changed
    remote = not isinstance(store, LocalStore)  # a local store's folder is the final place: nothing to upload
    checkpoint = ModelCheckpoint(
        folder,
        spec.train.checkpoint,
        spec.train.early_stopping,
        {"config": config, "run_id": job.run_id},
        uploads=BackgroundUploads(store) if remote and rank.is_main else None,
        store_key=job.store_key,
        writer=rank.is_main,
    )
    trainer = build_trainer(spec, store, _callbacks(job, rank, checkpoint), job.model, job.loss, rank, device)
    main_store = store if remote and rank.is_main else None
    if rank.distributed:
        resumed_from = resume_ranks(trainer, rank, folder, spec.train.resume, config, main_store, job.store_key)
    else:
        resumed_from = resume_checkpoint(trainer, folder, spec.train.resume, config, main_store, job.store_key)
    fit = trainer.fit()  # with a remote store, model.pt is already uploaded: put_file below only checks it
    if not rank.is_main:
        return None
    facts = trainer.describe()
    doctor = next((cb for cb in trainer.callbacks if isinstance(cb, Doctor)), None)
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
        effective_batch_size=facts["effective_batch_size"],
        micro_batch_size=facts["micro_batch_size"],
        world_size=facts["world_size"],
        nonfinite_steps=fit.nonfinite_steps,
        n_parameters=facts["n_parameters"],
        trainable_parameters=facts["trainable_parameters"],
        total_parameters=facts["n_parameters"],
        parent=spec.warm_start,
        resumed_from_step=resumed_from,
        checkpoint_uri=store.put_file(folder / FINAL, f"{job.store_key}/{FINAL}"),
        mlflow_run_id=job.run_id,
        findings=doctor.findings if doctor is not None else [],
        diagnosis_uri=store.put_bytes(doctor.diagnosis_json(), f"{job.store_key}/diagnosis.json") if doctor else None,
    )


def _callbacks(job: FitJob, rank: Rank, checkpoint: ModelCheckpoint) -> list[Callback]:
    """In the order the Trainer's docstring states: at an evaluation, tracking, then early stopping, then the
    checkpoint that must hold the stop decision."""
    train = job.spec.train
    fsdp = rank.distributed and train.distributed.strategy == "fsdp"  # saving is a collective: on every rank
    stack: list[Callback] = [TrackingCallback(job.logger)] if job.logger and rank.is_main else []
    stack += [EarlyStopping(train.early_stopping)] if train.early_stopping.enabled else []
    # stopped by a signal (Prefect's cancel, Ctrl-C): a checkpoint first; before ModelCheckpoint, whose
    # on_exception closes the uploads that checkpoint needs
    stack += [CheckpointOnSignal(checkpoint)] if rank.is_main and not rank.distributed else []
    stack += [checkpoint] if rank.is_main or fsdp else []
    stack += [ProgressBar(train.progress_bar)] if rank.is_main else []
    return stack + list(job.callbacks)  # the main rank's, or (other ranks) those that act on every replica
