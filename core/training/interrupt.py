"""A checkpoint on the way out. When SIGTERM (a cancelled Prefect flow run, a stopped container) or SIGINT
(Ctrl-C) reaches a fit, the fit saves a checkpoint at the end of its current optimizer step and stops;
then the signal's exception goes on as it would have (Prefect ends the run Cancelled, Ctrl-C is a
KeyboardInterrupt). A re-run resumes from that step, to the weights of an uninterrupted run.

How: the fit runs in a thread of its own while the main thread, where Python runs signal handlers, waits
for it. The handlers stay whatever they were (Prefect checks that its own is installed before it
acknowledges a cancel), and the exception they raise lands in the waiting main thread, never in the middle
of a step: the main thread asks the fit to stop at the step's end and waits until it has.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from core.training.callbacks import Callback

if TYPE_CHECKING:
    from core.training.checkpoint import ModelCheckpoint
    from core.training.trainer import Trainer

log = logging.getLogger(__name__)
T = TypeVar("T")


class FitStopped(BaseException):
    """The fit stopped at a step's end because the process is being stopped (not an error of the fit)."""


class CheckpointOnStop(Callback):
    """Saves a checkpoint and stops the fit at the end of the step during which `request` was called."""

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint
        self.requested = threading.Event()

    def request(self, reason: BaseException) -> None:
        log.warning("%s: checkpoint at the end of this step, then stop", type(reason).__name__)
        self.requested.set()

    def on_step_end(self, trainer: Trainer) -> None:
        if not self.requested.is_set():
            return
        step = trainer.state.step
        if self.checkpoint._saved_step != step:
            self.checkpoint.save(trainer)
        log.warning("checkpoint of step %d written; re-run the same command to resume from it", step)
        raise FitStopped(f"stopped at step {step}")


def fit_until_stopped(fit: Callable[[], T], stop: CheckpointOnStop) -> T:
    """Run `fit` in a thread; a signal's exception in this (main) thread makes it checkpoint and stop first."""
    outcome: dict[str, object] = {}
    context = contextvars.copy_context()  # the Prefect task run, for the progress artifact
    done = threading.Event()  # not Thread.join: on 3.11 a join cut short by a signal marks the thread as ended

    def target() -> None:
        try:
            outcome["result"] = context.run(fit)
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="fit", daemon=True).start()
    try:
        done.wait()
    except BaseException as exc:  # TerminationSignal, KeyboardInterrupt: raised by a signal handler here
        stop.request(exc)
        done.wait()  # a second signal ends the wait, and the process with it
        if isinstance(outcome.get("error"), FitStopped | None):
            raise
        raise exc from outcome["error"]  # type: ignore[misc]
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
