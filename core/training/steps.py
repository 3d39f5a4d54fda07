"""The loop's bookkeeping around the step: how many steps an epoch has, micro-batches grouped into
optimizer-step windows (timing the wait on the loader), and how a micro-batch is split after an
out-of-memory error."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterable, Iterator

import torch

from trainflow.core.config import TrainConfig
from trainflow.core.data.loaders import Batch


def step_budget(n_micro_batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for an epoch of `n_micro_batches`: the one
    place the loop's length is computed, so the LR schedule and the loop cannot disagree. Splitting the
    micro-batch by k and multiplying accumulation by k (OOM recovery) leaves both unchanged."""
    steps_per_epoch = math.ceil(n_micro_batches / cfg.grad_accum_steps)  # a short last window is a step
    total = cfg.max_epochs * steps_per_epoch
    return steps_per_epoch, total if cfg.max_steps is None else min(cfg.max_steps, total)


class DataWait:
    """Seconds the loop spent waiting for the loader's next batch (the rest of a step is compute)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def batches(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        iterator = iter(loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield batch


def step_windows(batches: Iterable[Batch], size: int, wait: DataWait | None = None) -> Iterator[list[Batch]]:
    """Group micro-batches into optimizer-step windows; the epoch's last window may be shorter."""
    window: list[Batch] = []
    for batch in wait.batches(batches) if wait is not None else batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def split_factor(micro_batch: int) -> int | None:
    """The smallest k > 1 dividing `micro_batch` (None for 1): micro-batches of micro_batch/k with k times
    the accumulation cover exactly the same samples, so the update does not change."""
    for k in range(2, micro_batch + 1):
        if micro_batch % k == 0:
            return k
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
