"""Resume a fit from its folder's latest checkpoint (the store's, when the local folder is gone), or clear old
checkpoints when `train.resume` is off; on several ranks, every rank continues from the checkpoint the main
rank picks. Each config value that differs from the checkpoint's is logged with the value that wins."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.storage.uploads import ListingStore
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
from trainflow.core.training.distributed import Rank, all_agree, broadcast_object
from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)


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
    return next(cb.folder for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))
