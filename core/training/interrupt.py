"""A checkpoint on the way out, when SIGTERM (a cancelled Prefect flow run, a stopped container) or SIGINT
(Ctrl-C) stops a fit; a re-run resumes from it to the weights of an uninterrupted run.

Two ways, by who handles the signal:
- Python's or the OS's default handler: while the fit runs, ours notes the signal; at the end of the current
  optimizer step a checkpoint is written, then the signal takes its usual course (KeyboardInterrupt, exit).
- A handler that must stay in place (Prefect's: it acknowledges a cancel only while its own handler is
  installed) raises in the middle of a step. When that lands while the step is still computing its
  gradients, nothing a checkpoint holds has changed since the last step but the torch RNG (dropout): it is
  put back to its state at that step's start and the checkpoint written. Landing inside the optimizer
  update or an epoch's end (`Trainer.updating`), it leaves only the last periodic checkpoint.

The fit stays on the calling thread: running it on a thread of its own (so handlers could wait in the main
thread) halved CPU training speed here, two OpenMP thread pools on two cores.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from trainflow.core.training.callbacks import Callback
from trainflow.core.training.state import FitResult

if TYPE_CHECKING:
    from trainflow.core.training.checkpoint import ModelCheckpoint
    from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
KEPT_HANDLER_MODULES = ("prefect.",)  # handlers that must stay installed for their owner to work


class CheckpointOnSignal(Callback):
    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._rng: list[torch.Tensor] = []  # torch's RNG at the last step boundary
        self._stopping = False  # the noted signal's checkpoint is written; it is being delivered

    def on_fit_start(self, trainer: Trainer) -> None:
        self._rng = _torch_rng()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if not getattr(current, "__module__", "").startswith(KEPT_HANDLER_MODULES):
                self._previous[signum] = current
                signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second signal: no more waiting for the step to end
            self._restore()
            _deliver(signum, frame)
            return
        self.received = signum
        log.warning("%s received: checkpoint at the end of this step, then stop", signal.Signals(signum).name)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.received is None:
            self._rng = _torch_rng()
            return
        signum, self.received = self.received, None
        self._save(trainer)
        self._restore()
        self._stopping = True
        _deliver(signum, None)

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._restore()
        if isinstance(exc, Exception) or self._stopping or trainer.updating:
            if not isinstance(exc, Exception) and trainer.updating and not self._stopping:
                log.warning("%s during an optimizer update: the last periodic checkpoint stands", type(exc).__name__)
            return  # an error, not a stop; or already saved at the step's end; or no consistent state
        _set_torch_rng(self._rng)  # the gradients being computed are dropped: so are the draws they made
        self._save(trainer)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self._restore()

    def _save(self, trainer: Trainer) -> None:
        if self.checkpoint._saved_step != trainer.state.step:
            path = self.checkpoint.save(trainer)
            log.warning("stopped: checkpoint %s of step %d written; re-run to resume", path.name, trainer.state.step)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _deliver(signum: int, frame: FrameType | None) -> None:
    """What the signal does without us: the handler now back in place, or the default action."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, frame)
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        raise SystemExit(128 + signum)


def _torch_rng() -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])]


def _set_torch_rng(states: list[torch.Tensor]) -> None:
    if states:
        torch.set_rng_state(states[0])
        if len(states) > 1:
            torch.cuda.set_rng_state_all(states[1:])
