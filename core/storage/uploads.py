"""Background uploads of checkpoints: a `BackgroundWorker` (`background.py`) whose jobs put files into a store,
so the training loop does not wait on the network. At most `MAX_PENDING` uploads wait beside the one in flight;
a failed upload fails the training (TrainingError naming the store URI) at the next submit or wait."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from trainflow.core.errors import TrainingError
from trainflow.core.storage.background import BackgroundWorker
from trainflow.core.storage.store import ArtifactStore

MAX_PENDING = 2  # jobs waiting beside the one in flight before `submit` blocks


@runtime_checkable
class ListingStore(Protocol):
    """A store that can list and delete objects under a key folder (S3Store), for pruning in the store."""

    def list_keys(self, prefix_key: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


class BackgroundUploads(BackgroundWorker):
    """Upload jobs for `store`, run in order on one worker thread."""

    def __init__(self, store: ArtifactStore, max_pending: int = MAX_PENDING):
        super().__init__("checkpoint-uploads", _upload_failed, max_pending)
        self.store = store

    def put_file(self, src: Path, key: str) -> None:
        """Queue `store.put_file(src, key)`."""
        self.submit(lambda: self.store.put_file(src, key), self.store.uri_for(key))


def _upload_failed(what: str, exc: BaseException) -> TrainingError:
    return TrainingError(f"checkpoint upload to {what} failed: {exc}")
