"""A checkpoint on the way out: SIGTERM (a cancelled Prefect flow run, a stopped container, a pre-empted
machine) or SIGINT (Ctrl-C) during a fit saves a checkpoint at the end of the current optimizer step,
then the signal takes its usual course (Prefect's handler ends the run Cancelled; Ctrl-C raises
KeyboardInterrupt). A re-run resumes from that step, to the weights of an uninterrupted run.

Signal handlers belong to the main thread: a fit elsewhere (a Prefect task in a worker thread, a trial
thread) keeps the periodic checkpoints only.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from core.training.callbacks import Callback
from core.training.state import FitResult

if TYPE_CHECKING:
    from core.training.checkpoint import ModelCheckpoint
    from core.training.trainer import Trainer

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class CheckpointOnSignal(Callback):
    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second signal: no more waiting for the step to end
            self._restore()
            self._deliver(signum, frame)
            return
        self.received = signum
        log.warning("%s received: checkpoint at the end of this step, then stop", signal.Signals(signum).name)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.received is None:
            return
        signum, self.received = self.received, None
        if self.checkpoint._saved_step != trainer.state.step:
            path = self.checkpoint.save(trainer)
            log.warning("checkpoint %s written at step %d; a re-run resumes from it", path.name, trainer.state.step)
        self._restore()
        self._deliver(signum, None)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _deliver(self, signum: int, frame: FrameType | None) -> None:
        """What the signal would have done without us: the previous handler, or the default action."""
        handler = signal.getsignal(signum)  # restored: the handler in place before the fit
        if callable(handler):
            handler(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)
