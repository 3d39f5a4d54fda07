"""The train stage: fit the tuned training spec's model with tracking, early stopping, checkpointing and a
progress bar; resume from the last checkpoint of an interrupted run of the same spec.

Builds on core/training/: fit.py (a fit in a store folder: lock, resume, ranks), spec.py (what a training is),
builder.py (spec -> Trainer), trainer.py (the loop and its step), callbacks.py (tracking, early stopping,
progress), checkpoint.py (save, resume, best weights).
"""

from __future__ import annotations

from collections.abc import Sequence

from trainflow.core.records import TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.callbacks import Callback, MetricLogger
from trainflow.core.training.fit import fit_in_folder
from trainflow.core.training.spec import TrainingSpec


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
    return fit_in_folder(spec, store, store_key, logger, run_id, callbacks)
