"""Fit in a store folder: the callback stack (tracking, early stopping, checkpoint, progress), resume
from the folder's latest checkpoint or clear old ones, fit, and hand on the final weights.

With a remote store (S3), checkpoints are uploaded in the background as they are written (see
checkpoint.py), the last upload awaited before `fit_in_folder` returns; a run whose local folder is gone
(another machine, a wiped cache) resumes from the checkpoint the store's index names.

Shared by the train stage and the compress stage (fine-tuning a pruned model, training a
distillation student), so each gets early stopping, checkpoints and crash-safe resume the same way.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainflow.core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from trainflow.core.errors import TrainingError
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore, LocalStore
from trainflow.core.storage.uploads import BackgroundUploads, ListingStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback, EarlyStopping, MetricLogger, ProgressBar, TrackingCallback
from trainflow.core.training.checkpoint import (
    BEST,
    FINAL,
    INDEX,
    ModelCheckpoint,
    fetch_latest_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    periodic_checkpoints,
    remove_checkpoint,
)
from trainflow.core.training.distributed import SINGLE, Rank
from trainflow.core.training.interrupt import CheckpointOnSignal
from trainflow.core.training.state import FitResult
from trainflow.core.training.trainer import LossFn, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderFit:
    """What `fit_in_folder` leaves: the loop's facts, the best evaluation, and the weights handed on."""

    fit: FitResult  # stop reason and message, epochs, steps, samples/s, non-finite steps
    best_metrics: dict[str, float]  # the best evaluation of the monitored metric
    best_step: int | None
    resumed_from: int | None  # the step resumed from; None: started fresh
    weights_uri: str  # `<store_key>/model.pt` in the store: the best weights when restore_best is on
    weights_path: Path  # the same file on this machine
    facts: dict[str, Any]  # `Trainer.describe()`: effective batch, world size, parameters, ...
    model: nn.Module  # holds the weights handed on (on CPU after a multi-process fit)


@dataclass(frozen=True)
class FitJob:
    """Everything a fit needs; picklable, so launched ranks receive it."""

    model_cfg: ModelConfig
    optim_cfg: OptimConfig
    train_cfg: TrainConfig
    loader_cfg: LoaderConfig
    seed: int
    data: PrepareDataResult
    store: ArtifactStore
    store_key: str
    logger: MetricLogger | None = None
    run_id: str | None = None
    callbacks: Sequence[Callback] = ()
    model: nn.Module | None = None
    loss: LossFn | None = None
    extra_config: Mapping[str, Any] | None = None


def fit_in_folder(
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
    model: nn.Module | None = None,
    loss: LossFn | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> FolderFit:
    """Fit with checkpoints in `<store>/<store_key>/`, resuming there after a crash (`train.resume`);
    on `train.distributed`'s ranks when it asks for more than one process (see `core.training.launch`).

    Args:
        model: a pre-built model (pruned, or a student) instead of one built from `model_cfg`; to resume,
            pass the same model again: the checkpoint's weights load into it.
        loss: the training loss hook (e.g. `core.compression.distillation.DistillationLoss`).
        extra_config: more sections (e.g. the compress section) recorded in checkpoints beside model,
            optim, train, loader and seed; on resume, each difference is logged with the value that wins.
        logger, callbacks: used by the main rank only (they travel to it pickled).

    Raises:
        ConfigError: a setting does not fit this data or machine (checked before any training step).
        TrainingError: training diverged, a rank failed, or the checkpoint to resume from cannot be loaded.
    """
    job = FitJob(model_cfg, optim_cfg, train_cfg, loader_cfg, seed, data, store, store_key, logger, run_id,
                 callbacks, model, loss, extra_config)  # fmt: skip
    with one_fit_at_a_time(store.workdir(store_key)):
        if train_cfg.distributed.enabled:
            from trainflow.core.training.launch import launch_fit

            return launch_fit(job)
        return fit_rank(job)


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


def fit_rank(job: FitJob, rank: Rank = SINGLE, device: torch.device | None = None) -> FolderFit:
    """The fit as one rank runs it: the main rank logs, checkpoints and writes the weights; every rank
    resumes from the main rank's checkpoint."""
    folder = job.store.workdir(job.store_key)
    train_cfg = job.train_cfg
    sections = {"model": job.model_cfg, "optim": job.optim_cfg, "train": train_cfg, "loader": job.loader_cfg}
    config = {name: section.model_dump(mode="json") for name, section in sections.items()} | {"seed": job.seed}
    config |= dict(job.extra_config or {})
    remote = not isinstance(job.store, LocalStore)  # a local store's folder is the final place: nothing to upload
    checkpoint = ModelCheckpoint(
        folder,
        train_cfg.checkpoint,
        train_cfg.early_stopping,
        {"config": config, "run_id": job.run_id},
        uploads=BackgroundUploads(job.store) if remote and rank.is_main else None,
        store_key=job.store_key,
        writer=rank.is_main,
    )
    fsdp = rank.distributed and train_cfg.distributed.strategy == "fsdp"  # saving is a collective: on every rank
    stack: list[Callback] = [TrackingCallback(job.logger)] if job.logger and rank.is_main else []
    stack += [EarlyStopping(train_cfg.early_stopping)] if train_cfg.early_stopping.enabled else []
    # stopped by a signal (Prefect's cancel, Ctrl-C): a checkpoint first; before ModelCheckpoint, whose
    # on_exception closes the uploads that checkpoint needs
    stack += [CheckpointOnSignal(checkpoint)] if rank.is_main and not rank.distributed else []
    stack += [checkpoint] if rank.is_main or fsdp else []
    stack += [ProgressBar(train_cfg.progress_bar)] if rank.is_main else []
    stack += job.callbacks  # the main rank's, or (other ranks) those that act on every replica
    trainer = build_trainer(job.model_cfg, job.optim_cfg, train_cfg, job.loader_cfg, job.seed, job.data, job.store,
                            stack, model=job.model, loss=job.loss, rank=rank, device=device)  # fmt: skip
    main_store = job.store if remote and rank.is_main else None
    if rank.distributed:
        from trainflow.core.training.launch import resume_ranks

        resumed_from = resume_ranks(trainer, rank, folder, train_cfg.resume, config, main_store, job.store_key)
    else:
        resumed_from = resume_checkpoint(trainer, folder, train_cfg.resume, config, main_store, job.store_key)
    fit = trainer.fit()  # with a remote store, model.pt is already uploaded: put_file below only checks it
    weights_uri = job.store.put_file(folder / FINAL, f"{job.store_key}/{FINAL}") if rank.is_main else ""
    return FolderFit(fit, checkpoint.best_metrics, checkpoint.best_step, resumed_from, weights_uri,
                     folder / FINAL, trainer.describe(), trainer.module)  # fmt: skip


def resume_checkpoint(
    trainer: Trainer,
    folder: Path,
    resume: bool,
    config: dict[str, Any],
    remote: ArtifactStore | None = None,
    store_key: str = "",
) -> int | None:
    """Restore the checkpoint `checkpoint_to_resume` picks; the step resumed from, or None."""
    latest = checkpoint_to_resume(folder, resume, remote, store_key)
    if latest is None:
        return None
    payload = load_checkpoint(latest)
    for key, saved, current in _differences(payload.get("config", {}), config):
        log.info("resume: %s is %r in the checkpoint and %r in the config; the config value wins", key, saved, current)
    return restore_checkpoint(trainer, payload, latest)


def checkpoint_to_resume(folder: Path, resume: bool, remote: ArtifactStore | None, store_key: str) -> Path | None:
    """The last checkpoint (resume on): the local folder's, else (a `remote` store) the one the store's index
    names, downloaded. Resume off: clear old ones, in the store too, so they cannot mix with a fresh run."""
    latest = latest_checkpoint(folder)
    if not resume:
        if latest is not None or remote is not None:
            _clear(folder, remote, store_key)
        return None
    if latest is None and remote is not None:
        latest = fetch_latest_checkpoint(remote, store_key)
    return latest


def restore_checkpoint(trainer: Trainer, payload: dict[str, Any], path: Path) -> int:
    """`trainer.restore` with a one-line error when the checkpoint was written for another model."""
    try:
        trainer.restore(payload, path.parent)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes (another model)
        raise TrainingError(
            f"{path}: checkpoint does not fit this model ({str(exc).splitlines()[0]}); pass the model it was "
            "written for, delete the checkpoint to start over, or set train.resume=false"
        ) from None
    state = trainer.state
    log.info("resuming from %s: epoch %d, batch %d, step %d", path.name, state.epoch, state.batch_in_epoch, state.step)
    return state.step


def _clear(folder: Path, remote: ArtifactStore | None, store_key: str) -> None:
    """Remove the checkpoints of an earlier run, locally and (a listing store) in the store, index first."""
    for path in periodic_checkpoints(folder):
        remove_checkpoint(path)
    for name in (BEST, FINAL, INDEX):
        (folder / name).unlink(missing_ok=True)
    if isinstance(remote, ListingStore):
        stored = {k.rsplit("/", 1)[-1] for k in remote.list_keys(store_key)}
        for name in [n for n in (INDEX, BEST, FINAL) if n in stored] + sorted(
            n for n in stored if n.startswith("step-")
        ):
            remote.delete(f"{store_key}/{name}")
    log.info("train.resume=false: starting over, old checkpoints in %s removed", folder)


def _differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]
