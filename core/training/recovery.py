"""What the Trainer decides when a step fails in a way it can survive, as pure decisions the Trainer applies
(`Trainer.split_micro_batch`, `Trainer._guarded_step`): a non-finite gradient (skip the step, stop after too many
in a row) and a CUDA out-of-memory error (split the micro-batch, keep the effective batch)."""

from __future__ import annotations

import logging

from trainflow.core.errors import TrainingError
from trainflow.core.training.state import TrainState

log = logging.getLogger(__name__)


def micro_batch_split(micro_batch: int, distributed: bool, exc: BaseException) -> int:
    """The factor k to split a micro-batch by after a CUDA out-of-memory error: the smallest k > 1 dividing it, so
    micro-batches of micro_batch/k with k times the accumulation cover the same samples and give the same update.

    Raises:
        TrainingError: a micro-batch of 1 cannot be split, or ranks are training (they cannot agree on a split
            inside a step: lower train.batch_size, or use batch_size: auto).
    """
    factor = next((k for k in range(2, micro_batch + 1) if micro_batch % k == 0), None)
    if distributed or factor is None:
        why = "a micro-batch of 1 cannot be split" if factor is None else "ranks cannot split in step"
        raise TrainingError(
            f"train: CUDA out of memory at micro-batch {micro_batch} ({why}); set a smaller train.batch_size, "
            "or train.batch_size: auto"
        ) from exc
    return factor


def count_nonfinite(state: TrainState, finite: bool, limit: int, lr: float) -> None:
    """Count in `state` a step skipped for a non-finite gradient norm (a finite one resets the run of them).

    Raises:
        TrainingError: `limit` (train.max_nonfinite_steps) steps skipped in a row.
    """
    if finite:
        state.nonfinite_in_row = 0
        return
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    log.warning("non-finite gradient norm, step skipped (%d in a row, up to step %d)", state.nonfinite_in_row,
                state.step)  # fmt: skip
    if state.nonfinite_in_row >= limit:
        raise TrainingError(
            f"train: {state.nonfinite_in_row} optimizer steps in a row had non-finite gradients (last at step "
            f"{state.step}, lr {lr:.3g}); lower optim.lr, set train.grad_clip_norm or use fp32 (limit: "
            f"train.max_nonfinite_steps={limit})"
        )
