"""A fit on several processes: the stage's process launches the ranks (torch's elastic launcher), each
runs `fit_rank`, and the main rank's record comes back; other machines join with `join_training`.

The ranks receive the job (the training spec with its prepared-data record, the store, the tracking run)
from the main rank by broadcast, so a joining machine needs only the config's `train.distributed`
section and a store every machine can read (s3://, or a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch.distributed as dist

from trainflow.core.config import TrainConfig
from trainflow.core.records import TrainResult
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.distributed import (
    broadcast_object,
    check_distributed,
    init_rank,
    launch,
    note_rank_failure,
)
from trainflow.core.training.fit_rank import FitJob, fit_rank
from trainflow.core.training.precision import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Joining:
    """What a joining machine's ranks start from: its own train section; the job comes by broadcast."""

    train_cfg: TrainConfig


def launch_fit(job: FitJob) -> TrainResult:
    """Run `job` on `train.distributed`'s ranks (this machine is node 0); the main rank's record. A model the
    job brought (a pruned model being fine-tuned) ends holding the weights the main rank wrote."""
    train = job.spec.train
    check_distributed(train, getattr(job.store, "uri", None))
    results = launch(train.distributed, rank_main, job, rendezvous_id(train))
    record: TrainResult = next(r for r in results.values() if r is not None)
    if job.model is not None:
        job.model.load_state_dict(load_checkpoint(job.store.local_path(record.checkpoint_uri))["model"])
    return record


def join_training(train_cfg: TrainConfig) -> None:
    """Take part, from this machine (`train.distributed.node_rank` > 0), in the train stage node 0 runs."""
    check_distributed(train_cfg)
    launch(train_cfg.distributed, rank_main, Joining(train_cfg), rendezvous_id(train_cfg))


def rendezvous_id(train_cfg: TrainConfig) -> str:
    """The same on every machine: only the shared endpoint names the run."""
    return "trainflow-" + train_cfg.distributed.rdzv_endpoint.replace(":", "-").replace(".", "-")


def rank_main(job: FitJob | Joining) -> TrainResult | None:
    """One rank (in a process the launcher started): join the group, receive the job, fit; the main rank
    returns the record the stage keeps."""
    train_cfg = job.spec.train if isinstance(job, FitJob) else job.train_cfg
    rank, device = init_rank(train_cfg.distributed, resolve_device(train_cfg.device).type)
    try:
        received = broadcast_object(job if isinstance(job, FitJob) else None, device, src=rank.main)
        assert received is not None, "the main rank holds the job"
        if not rank.is_main:
            every_rank = tuple(cb for cb in received.callbacks if cb.every_rank)
            received = dataclasses.replace(received, logger=None, callbacks=every_rank)
        return fit_rank(received, rank, device)
    except BaseException as exc:
        note_rank_failure(rank.rank, exc)  # before the group closes and its peers fail as well
        raise
    finally:
        dist.destroy_process_group()
