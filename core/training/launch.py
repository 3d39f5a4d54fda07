"""A fit on several processes: the stage's process launches the ranks (torch's elastic launcher), each
runs `fit_rank`, and the main rank's record comes back; other machines join with `join_training`.

The ranks receive the job (resolved configs, the prepared-data record, the store, the tracking run)
from the main rank by broadcast, so a joining machine needs only the config's `train.distributed`
section and a store every machine can read (s3://, or a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainflow.core.config import TrainConfig
from trainflow.core.errors import ConfigError
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.checkpoint import latest_checkpoint, load_checkpoint
from trainflow.core.training.distributed import (
    Rank,
    all_agree,
    broadcast_object,
    check_distributed,
    init_rank,
    launch,
    note_rank_failure,
)
from trainflow.core.training.precision import resolve_device
from trainflow.core.training.run import (
    FitJob,
    FolderFit,
    checkpoint_to_resume,
    fit_rank,
    restore_checkpoint,
    resume_checkpoint,
)
from trainflow.core.training.state import FitResult
from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSummary:
    """The main rank's FolderFit without its model (the weights file carries it back)."""

    fit: FitResult
    best_metrics: dict[str, float]
    best_step: int | None
    resumed_from: int | None
    weights_uri: str
    weights_path: Path
    facts: dict[str, Any]


@dataclass(frozen=True)
class Joining:
    """What a joining machine's ranks start from: its own train section; the job comes by broadcast."""

    train_cfg: TrainConfig


def launch_fit(job: FitJob) -> FolderFit:
    """Run `job` on `train.distributed`'s ranks (this machine is node 0); the main rank's FolderFit, its
    model rebuilt here from the weights it wrote."""
    check_distributed(job.train_cfg, getattr(job.store, "uri", None))
    results = launch(job.train_cfg.distributed, rank_main, job, rendezvous_id(job.train_cfg))
    summary: FitSummary = next(r for r in results.values() if r is not None)
    model = job.model
    if model is None:
        from trainflow.core.models import build_model

        model = build_model(job.model_cfg, job.data.spec)
    model.load_state_dict(load_checkpoint(summary.weights_path)["model"])
    return FolderFit(summary.fit, summary.best_metrics, summary.best_step, summary.resumed_from, summary.weights_uri,
                     summary.weights_path, summary.facts, model.to("cpu"))  # fmt: skip


def join_training(train_cfg: TrainConfig) -> None:
    """Take part, from this machine (`train.distributed.node_rank` > 0), in the train stage node 0 runs."""
    check_distributed(train_cfg)
    launch(train_cfg.distributed, rank_main, Joining(train_cfg), rendezvous_id(train_cfg))


def rendezvous_id(train_cfg: TrainConfig) -> str:
    """The same on every machine: only the shared endpoint names the run."""
    return "trainflow-" + train_cfg.distributed.rdzv_endpoint.replace(":", "-").replace(".", "-")


def rank_main(job: FitJob | Joining) -> FitSummary | None:
    """One rank (in a process the launcher started): join the group, receive the job, fit; the main rank
    returns the summary the stage records."""
    train_cfg = job.train_cfg
    rank, device = init_rank(train_cfg.distributed, resolve_device(train_cfg.device).type)
    try:
        received = broadcast_object(job if isinstance(job, FitJob) else None, device, src=rank.main)
        assert received is not None, "the main rank holds the job"
        if not rank.is_main:
            every_rank = tuple(cb for cb in received.callbacks if cb.every_rank)
            received = dataclasses.replace(received, logger=None, callbacks=every_rank)
        done = fit_rank(received, rank, device)
        if not rank.is_main:
            return None
        return FitSummary(fit=done.fit, best_metrics=done.best_metrics, best_step=done.best_step,
                          resumed_from=done.resumed_from, weights_uri=done.weights_uri, weights_path=done.weights_path,
                          facts=done.facts)  # fmt: skip
    except BaseException as exc:
        note_rank_failure(rank.rank, exc)  # before the group closes and its peers fail as well
        raise
    finally:
        dist.destroy_process_group()


def resume_ranks(
    trainer: Trainer, rank: Rank, folder: Path, resume: bool, config: dict[str, Any], remote: ArtifactStore | None,
    store_key: str,
) -> int | None:  # fmt: skip
    """Every rank continues from the checkpoint the main rank picks. DDP: the main rank restores it and the
    others load the same file (or receive its state when they cannot read it); FSDP: each rank reads its
    own shards (the folder must be shared)."""
    if not trainer.sharded:
        resumed = resume_checkpoint(trainer, folder, resume, config, remote, store_key) if rank.is_main else None
        return share_resumed_state(trainer, rank, resumed)
    path = checkpoint_to_resume(folder, resume, remote, store_key) if rank.is_main else None
    shared = broadcast_object(str(path) if path else None, trainer.device, rank.main)
    if shared is None:
        return None
    if not all_agree(Path(shared).exists(), trainer.device):
        raise ConfigError(f"train.distributed.strategy: fsdp: {shared} is not readable on every rank; "
                          "sharded checkpoints need a folder all ranks share")  # fmt: skip
    return restore_checkpoint(trainer, load_checkpoint(Path(shared)), Path(shared))


def share_resumed_state(trainer: Trainer, rank: Rank, resumed_from: int | None) -> int | None:
    """DDP: the other ranks take the main rank's restored state: each loads the file itself when every rank can
    read it (one machine, a shared folder), else the main rank's state is broadcast."""
    path = latest_checkpoint(trainer_folder(trainer)) if rank.is_main and resumed_from is not None else None
    path = broadcast_object(str(path) if path else None, trainer.device, rank.main)
    if path is None:
        return None
    if all_agree(Path(path).exists(), trainer.device):
        payload: dict[str, Any] | None = load_checkpoint(Path(path)) if not rank.is_main else None
    else:
        payload = broadcast_object(trainer.checkpoint_state() if rank.is_main else None, trainer.device, rank.main)
    if not rank.is_main:
        assert payload is not None
        trainer.restore(payload)
    return trainer.state.step


def trainer_folder(trainer: Trainer) -> Path:
    from trainflow.core.training.checkpoint import ModelCheckpoint

    return next(cb.folder for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))
