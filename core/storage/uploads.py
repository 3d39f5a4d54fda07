"""Background uploads: one worker thread runs upload jobs (calls of `store.put_file` and the like) in
order, so the training loop does not wait on the network.

The queue is bounded: at most `max_pending` jobs wait beside the one in flight; a `submit` beyond that
blocks until one finishes, so a store slower than checkpointing slows training down instead of filling
the disk with files waiting for upload. Jobs run in submission order. The first failure is kept; later
jobs are skipped (an index must never be written after the checkpoint it names failed) and the failure
is raised, as TrainingError naming the store URI, at the next `submit` or `wait`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from trainflow.core.errors import TrainingError
from trainflow.core.storage.store import ArtifactStore

log = logging.getLogger(__name__)

MAX_PENDING = 2  # jobs waiting beside the one in flight before `submit` blocks


@runtime_checkable
class ListingStore(Protocol):
    """A store that can list and delete objects under a key folder (S3Store), for pruning in the store."""

    def list_keys(self, prefix_key: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


class BackgroundUploads:
    """A worker thread with a bounded queue of upload jobs for `store` (started on first submit)."""

    def __init__(self, store: ArtifactStore, max_pending: int = MAX_PENDING):
        self.store = store
        self._queue: queue.Queue[tuple[Callable[[], None], str] | None] = queue.Queue(maxsize=max_pending)
        self._done = threading.Condition()
        self._unfinished = 0
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self.blocked_s = 0.0  # time `submit` spent waiting for room in the queue

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Queue `job` (described by `what`, e.g. the object's URI); blocks while the queue is full.

        Raises:
            TrainingError: an earlier upload failed.
        """
        self.raise_failure()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-uploads", daemon=True)
            self._thread.start()
        with self._done:
            self._unfinished += 1
        started = time.perf_counter()
        self._queue.put((job, what))
        self.blocked_s += time.perf_counter() - started

    def put_file(self, src: Path, key: str) -> None:
        """Queue `store.put_file(src, key)`."""
        self.submit(lambda: self._put(src, key), self.store.uri_for(key))

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued job has finished (at most `timeout_s`); False when time ran out.

        Raises:
            TrainingError: an upload failed.
        """
        with self._done:
            finished = self._done.wait_for(lambda: self._unfinished == 0, timeout_s)
        self.raise_failure()
        return finished

    def close(self, timeout_s: float | None = None) -> bool:
        """`wait`, then stop the worker (a daemon: a stuck upload never keeps the process alive)."""
        try:
            return self.wait(timeout_s)
        finally:
            if self._thread is not None and self._thread.is_alive():
                with contextlib.suppress(queue.Full):  # still busy after the timeout: left to die with the process
                    self._queue.put_nowait(None)
            self._thread = None

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise TrainingError(self._failure)

    def _put(self, src: Path, key: str) -> None:
        self.store.put_file(src, key)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, what = item
            try:
                if self._failure is None:
                    job()
            except Exception as exc:
                self._failure = f"checkpoint upload to {what} failed: {exc}"
                log.error("%s", self._failure)
            finally:
                with self._done:
                    self._unfinished -= 1
                    self._done.notify_all()
