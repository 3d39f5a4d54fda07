"""The train stage: fit the tuned training spec's model with tracking, early stopping, checkpointing, a progress
bar and the training doctor (`train.diagnostics`); resume from the last checkpoint of an interrupted run of the
same spec.

Builds on core/training/: fit.py (a fit in a store folder: lock, resume, ranks), spec.py (what a training is),
builder.py (spec -> Trainer), trainer.py (the loop and its step), callbacks.py (tracking, early stopping,
progress), checkpoint.py (save, resume, best weights), diagnostics.py (the doctor).
"""

from __future__ import annotations

from collections.abc import Sequence

from trainflow.core.errors import TrainingError
from trainflow.core.records import TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.callbacks import Callback, MetricLogger
from trainflow.core.training.diagnostics import Doctor
from trainflow.core.training.fit import fit_in_folder
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import StopReason


def train(
    spec: TrainingSpec,
    store: ArtifactStore,
    store_key: str,
    logger: MetricLogger | None = None,
    run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train `spec`'s model on its prepared data; checkpoints and weights go to `<store>/<store_key>/`.

    Raises:
        ConfigError: a setting does not fit this data or machine (checked before any training step).
        TrainingError: training diverged, or the checkpoint to resume from cannot be loaded.
    """
    doctor = spec.train.diagnostics
    watch = [Doctor(doctor, spec.optim.lr, spec.lr_suggestion)] if doctor.enabled else []
    return fit_in_folder(spec, store, store_key, logger, run_id, [*watch, *callbacks])


def raise_if_stopped_by_doctor(result: TrainResult) -> None:
    """The stage fails (so its record is not cached) when the doctor ended the fit: a re-run of the same config
    resumes from its checkpoint, past the findings already reported.

    Raises:
        TrainingError: the fit's stop reason is the doctor's finding (`train.diagnostics.on_finding: stop`).
    """
    if result.stop_reason == StopReason.DIAGNOSIS.value:
        raise TrainingError(
            f"train: stopped at step {result.steps} by the training doctor (train.diagnostics.on_finding: stop): "
            f"{result.stop_message}; fix it and re-run, or re-run as is to resume from step {result.steps}"
        )
