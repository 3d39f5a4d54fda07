"""The loop's bookkeeping around the step: how many steps an epoch has, micro-batches grouped into optimizer
steps (timing the wait on the loader), and peak memory."""

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


def optimizer_steps(batches: Iterable[Batch], size: int, wait: DataWait | None = None) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step, `size` at a time (accumulation); the epoch's last step may have
    fewer."""
    step: list[Batch] = []
    for batch in wait.batches(batches) if wait is not None else batches:
        step.append(batch)
        if len(step) == size:
            yield step
            step = []
    if step:
        yield step


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
