"""Fit a training spec in a store folder, crash-safe: checkpoints in `<store>/<store_key>/`, a re-run resumes
there (`train.resume`), one fit of a folder at a time on a machine, on `train.distributed`'s ranks when it asks
for more than one process. What it leaves is a `TrainResult`, the train stage's record.

Shared by the train stage and the compress stage (fine-tuning a pruned model, training a distillation
student), so each gets early stopping, checkpoints and crash-safe resume the same way. Builds on
fit_rank.py (one rank's fit), resume.py and launch.py (the ranks).
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from trainflow.core.records import TrainResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.callbacks import Callback, MetricLogger
from trainflow.core.training.fit_rank import FitJob, fit_rank
from trainflow.core.training.launch import launch_fit
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.trainer import LossFn

log = logging.getLogger(__name__)


def fit_in_folder(
    spec: TrainingSpec,
    store: ArtifactStore,
    store_key: str,
    logger: MetricLogger | None = None,
    run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
    model: nn.Module | None = None,
    loss: LossFn | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Fit `spec` with checkpoints in `<store>/<store_key>/`, resuming there after a crash; the record names the
    weights handed on (`<store_key>/model.pt`: the best evaluation's when `restore_best` is on).

    Args:
        logger: where the main rank's metrics go (MLflow); `run_id` is the run the record names.
        callbacks: more callbacks; on other ranks only those marked `every_rank` act.
        model: a pre-built model (pruned, or a student) instead of one built from `spec.model`; it ends holding
            the weights handed on. To resume, pass the same model again: the checkpoint's weights load into it.
        loss: the training loss hook (e.g. `core.compression.distillation.DistillationLoss`).
        extra_config: more sections (e.g. the compress section) recorded in checkpoints beside the spec; on
            resume, each difference is logged with the value that wins.

    Raises:
        ConfigError: a setting does not fit this data or machine (checked before any training step).
        TrainingError: training diverged, a rank failed, or the checkpoint to resume from cannot be loaded.
    """
    job = FitJob(spec, store, store_key, logger, run_id, callbacks, model, loss, extra_config)
    with one_fit_at_a_time(store.workdir(store_key)):
        record = launch_fit(job) if spec.train.distributed.enabled else fit_rank(job)
    assert record is not None, "the main rank returns the record"
    return record


@contextmanager
def one_fit_at_a_time(folder: Path) -> Iterator[None]:
    """An exclusive lock on the fit's folder: a second run of the same config on this machine (another flow, a
    second `trainflow run`, a scheduled run beside an event's) waits here, then resumes from what the first left,
    instead of writing the same checkpoints at the same time."""
    with open(folder / ".fit.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another run is training the same thing here; waiting until it ends", folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # released when the file closes
