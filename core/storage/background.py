"""A background worker: one daemon thread runs jobs in submission order, so the caller (the training loop)
does not wait on the network or a database. Checkpoint uploads (`uploads.py`) and MLflow metric writes
(`core.tracking.runs`) use it.

The queue can be bounded: at most `max_pending` jobs wait beside the one in flight, and a `submit` beyond that
blocks until one finishes, so a store slower than checkpointing slows training down instead of filling the
disk. The first failure is kept; later jobs are skipped (an index must never be written after the checkpoint it
names failed) and the failure is raised, as the error `failure` makes of it, at the next `submit` or `wait`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Failure = Callable[[str, BaseException], Exception]  # (what the job was, its exception) -> the error to raise


class BackgroundWorker:
    """A worker thread (started on the first submit) with a queue of jobs, each described by `what`."""

    def __init__(self, name: str, failure: Failure, max_pending: int = 0):
        """`max_pending`: jobs waiting beside the one in flight before `submit` blocks; 0 = unbounded."""
        self.name, self.failure = name, failure
        self._queue: queue.Queue[tuple[Callable[[], None], str] | None] = queue.Queue(maxsize=max_pending)
        self._done = threading.Condition()
        self._unfinished = 0
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self.blocked_s = 0.0  # time `submit` spent waiting for room in the queue

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Queue `job`; blocks while the queue is full.

        Raises:
            Exception: an earlier job's failure, as `failure` made it.
        """
        self.raise_failure()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        with self._done:
            self._unfinished += 1
        started = time.perf_counter()
        self._queue.put((job, what))
        self.blocked_s += time.perf_counter() - started

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued job has finished (at most `timeout_s`); False when time ran out.

        Raises:
            Exception: a job's failure, as `failure` made it.
        """
        with self._done:
            finished = self._done.wait_for(lambda: self._unfinished == 0, timeout_s)
        self.raise_failure()
        return finished

    def close(self, timeout_s: float | None = None) -> bool:
        """`wait`, then stop the thread; one still busy after `timeout_s` is left to die with the process (a
        daemon: a stuck job never keeps the process alive)."""
        finished = False
        try:
            finished = self.wait(timeout_s)
            return finished
        finally:
            thread, self._thread = self._thread, None
            if thread is not None and thread.is_alive():
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(None)
                if finished or self._error is not None:  # idle now: it ends at once
                    thread.join()

    def raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, what = item
            try:
                if self._error is None:
                    job()
            except Exception as exc:
                self._error = self.failure(what, exc)
                log.error("%s", self._error)
            finally:
                with self._done:
                    self._unfinished -= 1
                    self._done.notify_all()
