"""Data-parallel ranks: started by torch's elastic launcher, one process group, and the few collectives the
loop needs (metric averages, a checkpoint handed from rank 0, the job a joining node receives).

`launch` runs `entrypoint(job)` on `nproc_per_node` processes per machine through
`torch.distributed.launcher.api.elastic_launch` (what `torchrun` runs): c10d rendezvous at
`rdzv_endpoint`, no restarts (re-running the stage resumes from its checkpoint instead), and the
agent watches its workers, so a rank that dies takes the others down at once and the stage fails with
that rank's error. Across machines, a dead peer is noticed when a collective times out
(`collective_timeout_s`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainflow.core.config import TrainConfig
from trainflow.core.config.distributed import DistributedConfig
from trainflow.core.errors import ConfigError, DataError, StoreError, TrainflowError, TrainingError
from trainflow.core.training.metrics import EvalPass

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """Where this process stands in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    main: int = 0  # the global rank of node 0's first process (rendezvous orders machines its own way)

    @property
    def is_main(self) -> bool:
        """Node 0's first process: the one that holds the job, logs, writes checkpoints and returns the record."""
        return self.rank == self.main

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Rank()


# ------------------------------------------------------------------------------ checks and launch
def backend_for(cfg: DistributedConfig, device_type: str) -> str:
    """auto -> nccl on CUDA, gloo otherwise; nccl without CUDA is a config error."""
    if cfg.backend == "nccl" and device_type != "cuda":
        raise ConfigError(
            "train.distributed.backend: 'nccl' needs CUDA devices, this run trains on cpu; use gloo or auto"
        )
    return cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")


def check_distributed(train: TrainConfig, store_uri: str | None = None) -> None:
    """Before any work: the launch can run here (devices, backend, endpoint resolvable, strategy)."""
    cfg = train.distributed
    if not cfg.enabled:
        return
    if cfg.strategy == "fsdp" and store_uri is not None and store_uri.startswith("s3://"):
        raise ConfigError(
            "train.distributed.strategy: fsdp writes sharded checkpoints from every rank into one folder; "
            "use a local or shared-filesystem store.uri, not s3:// (or strategy: ddp)"
        )
    from trainflow.core.training.precision import resolve_device

    device = resolve_device(train.device)
    backend_for(cfg, device.type)
    if device.type == "cuda" and cfg.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            f"train.distributed.nproc_per_node: {cfg.nproc_per_node} processes but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); one process per GPU"
        )
    if device.type == "mps":
        raise ConfigError("train.distributed: several processes cannot share an MPS device; use nproc_per_node 1")
    host = cfg.rdzv_endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ConfigError(
            f"train.distributed.rdzv_endpoint: host '{host}' cannot be resolved ({exc.strerror})"
        ) from None


def launch(cfg: DistributedConfig, entrypoint: Callable[[T], Any], job: T, run_id: str) -> dict[int, Any]:
    """Run `entrypoint(job)` on this machine's ranks; {global rank: return value} of its ranks.

    Raises:
        TrainflowError: of the first failed rank's type when it was one of ours (ConfigError, ...),
            else TrainingError; one line naming the rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        nproc_per_node=cfg.nproc_per_node,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=cfg.rdzv_endpoint,
        rdzv_configs={"join_timeout": cfg.rdzv_timeout_s, "rank": cfg.node_rank},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    log.info("launching %d x %d ranks (rendezvous %s, node %d)", cfg.nnodes, cfg.nproc_per_node,
             cfg.rdzv_endpoint, cfg.node_rank)  # fmt: skip
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_QUIET)  # the same filter object: added once
    handlers = _signal_handlers()  # the launcher installs its own for SIGTERM, SIGINT, ... and leaves them
    notes, noted_before = tempfile.mkdtemp(prefix="trainflow-ranks-"), os.environ.get(FAILURES_ENV)
    os.environ[FAILURES_ENV] = notes  # the ranks inherit it
    try:
        return elastic_launch(config, entrypoint)(job)
    except ChildFailedError as exc:
        rank, message = first_noted_failure(Path(notes)) or _as_pair(root_failure(exc.failures))
        raise rank_error(rank, message) from None
    except Exception as exc:  # rendezvous: no peer joined in time, endpoint unreachable, port taken
        if type(exc).__name__ == "RendezvousTimeoutError":
            raise TrainingError(
                f"train.distributed.rdzv_endpoint: not all {cfg.nnodes} machines met at {cfg.rdzv_endpoint} within "
                f"rdzv_timeout_s={cfg.rdzv_timeout_s} s; is node 0 running and is the endpoint reachable from here?"
            ) from None
        if type(exc).__module__.startswith("torch.distributed"):
            raise TrainingError(
                f"train.distributed: rendezvous at {cfg.rdzv_endpoint} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
            ) from None
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        shutil.rmtree(notes, ignore_errors=True)
        if noted_before is None:
            os.environ.pop(FAILURES_ENV, None)
        else:
            os.environ[FAILURES_ENV] = noted_before


def _signal_handlers() -> dict[int, Any]:
    """The handlers in place now (Prefect's cancel handler, Python's Ctrl-C), to put back after a launch."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    found = {sig: signal.getsignal(sig) for name in names if (sig := getattr(signal, name, None)) is not None}
    return {sig: handler for sig, handler in found.items() if handler is not None}  # None: not set from Python


class _QuietUserErrors(logging.Filter):
    """The launcher logs a failed rank's traceback; for one of our user errors the one-line message the
    stage raises says it all (a bug keeps its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(f"trainflow.core.errors.{name}:" in text or f"{name}: " in text for name in _OUR_ERRORS)


_OUR_ERRORS: dict[str, type[TrainflowError]] = {
    cls.__name__: cls for cls in (ConfigError, DataError, StoreError, TrainingError)
}
_QUIET = _QuietUserErrors()


FAILURES_ENV = "TRAINFLOW_RANK_FAILURES"  # the folder where failing ranks note their errors
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "Broken pipe")


def root_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failed rank that caused the others to fail: not one whose error only says a peer went away
    (gloo/NCCL), then the earliest."""

    def symptom(item: tuple[int, Any]) -> tuple[bool, float]:
        text = str(item[1].message)
        return any(mark in text for mark in _PEER_GONE), item[1].timestamp

    return min(failures.items(), key=symptom)


def note_rank_failure(rank: int, exc: BaseException) -> None:
    """In a failing rank, before its process group closes: its error, where the launcher looks first. Once the
    group closes, its peers fail too ("connection closed by peer"), and the launcher may see one of those
    before this rank's own exit."""
    folder = os.environ.get(FAILURES_ENV)
    stopped = not isinstance(exc, Exception) or type(exc).__name__ == "SignalException"  # the launcher stopping it
    if folder and not stopped:
        note = {"message": f"{type(exc).__name__}: {exc}", "timestamp": time.time()}
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(note))


def first_noted_failure(folder: Path) -> tuple[int, str] | None:
    """(rank, message) of the earliest noted failure that is not a lost peer; None when there is none."""
    notes = [
        (int(path.stem.removeprefix("rank-")), json.loads(path.read_text())) for path in folder.glob("rank-*.json")
    ]
    causes = [(note["timestamp"], rank, note["message"]) for rank, note in notes
              if not any(mark in note["message"] for mark in _PEER_GONE)]  # fmt: skip
    return (min(causes)[1], min(causes)[2]) if causes else None


def _as_pair(failure: tuple[int, Any]) -> tuple[int, Any]:
    return failure[0], failure[1].message


def rank_error(rank: int, message: Any) -> TrainflowError:
    """One line for a failed rank: its exception as it reported it, or the signal that killed it."""
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    first = text.strip().splitlines()[0] if text.strip() else "exited without an error message"
    kind, _, detail = first.partition(": ")
    if kind in _OUR_ERRORS:
        return _OUR_ERRORS[kind](f"rank {rank}: {detail}")
    return TrainingError(f"train: rank {rank} failed: {first}")


# ------------------------------------------------------------------------------- in a rank
def init_rank(cfg: DistributedConfig, device_type: str) -> tuple[Rank, torch.device]:
    """Join the process group the launcher set up (RANK, WORLD_SIZE, ... in the environment); pick this
    rank's device (cuda:LOCAL_RANK on GPUs); agree on the main rank (node_rank 0, local rank 0)."""
    global_rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # elastic_launch sets none: share the cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device_type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(cfg, device_type),
        timeout=timedelta(seconds=cfg.collective_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    candidate = torch.tensor([global_rank if cfg.node_rank == 0 and local == 0 else world], device=device)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
    rank = Rank(global_rank, world, local, int(candidate.item()))
    logging.basicConfig(
        level=logging.INFO if rank.is_main else logging.WARNING,
        format=f"[rank {rank.rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return rank, device


def broadcast_object(obj: T, device: torch.device, src: int) -> T:
    """`obj` as rank `src` has it, on every rank (pickled; for small objects and rare calls)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place, returned); a no-op outside a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_agree(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on every rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def reduced_eval(result: EvalPass, device: torch.device) -> EvalPass:
    """One rank's evaluation pass over its shard, summed with the others': the pass over the whole split."""
    totals = all_reduce_sum(
        torch.tensor(
            [result.loss * result.n_targets, result.n_targets, result.correct], dtype=torch.float64, device=device
        )
    ).tolist()
    return EvalPass(loss=totals[0] / max(totals[1], 1), n_targets=int(totals[1]), correct=int(totals[2]))
