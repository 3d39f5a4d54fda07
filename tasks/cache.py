"""Cross-run stage caching on Prefect's own cache: `Cached` states in the UI, records in the store.

The key is `core.records.stage_key` over the task's inputs (every argument but `ctx`) and the
code version. Records are JSON files in `<store>/.cache/prefect/`, beside the artifacts they
point to (an s3:// store keeps them in its local cache folder: this machine's records, S3's artifacts);
a record whose artifacts are gone is evicted before the lookup, so the stage re-runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem

from core.config import StoreConfig
from core.records import StageResult, stage_key
from core.storage.store import ArtifactStore, open_store

log = logging.getLogger(__name__)

UNKEYED = ("ctx",)  # run context (tracking ids, store location): where a stage logs, not what it computes


@dataclass
class StageCachePolicy(CachePolicy):
    stage: str = ""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        key = stage_key(self.stage, {k: v for k, v in inputs.items() if k not in UNKEYED})
        _evict_if_stale(task_ctx, key, inputs["ctx"].store)
        return key


def stage_cache(stage: str) -> dict[str, Any]:
    """`@task` options for a cached stage (the flow points result storage at the run's store)."""
    return {
        "name": stage,
        "cache_policy": StageCachePolicy(stage=stage),
        "persist_result": True,
        "result_serializer": "json",
    }


def result_storage(store: StoreConfig) -> Path:
    """Where stage records are persisted: inside a local store, beside the artifacts they point into; for an
    s3:// store in its local cache folder (records stay on this machine, their artifacts are in S3)."""
    return open_store(store).workdir(".cache/prefect")


def current_stage_key(stage: str) -> str:
    """The running task's cache key, to name the store folder of its outputs."""
    ctx = TaskRunContext.get()
    assert ctx is not None and ctx.parameters is not None, "only inside a stage task"
    return stage_key(stage, {k: v for k, v in ctx.parameters.items() if k not in UNKEYED})


def stage_store(store: StoreConfig, stage: str, folder: str | None = None) -> tuple[ArtifactStore, str]:
    """The run's store and the key of this stage run's folder in it, `<folder>/<cache key>` (default
    `stages/<stage>`): a re-run of the same inputs finds its own checkpoints and artifacts there."""
    return open_store(store), f"{folder or f'stages/{stage}'}/{current_stage_key(stage)}"


def _evict_if_stale(task_ctx: TaskRunContext, key: str, settings: StoreConfig) -> None:
    results = task_ctx.result_store
    if results is None or not results.exists(key):
        return
    try:
        record = results.read(key).result
        store = open_store(settings)
        missing = (
            [uri for uri in record.artifact_uris() if not store.exists(uri)] if isinstance(record, StageResult) else []
        )
    except Exception as exc:  # an unreadable record (older code, corrupt file) is as good as none
        missing = [f"record unreadable: {exc}"]
    if missing and isinstance(results.result_storage, LocalFileSystem):
        log.warning("%s: cached result points to missing artifacts (%s); recomputing", key, missing[0])
        Path(results.result_storage.basepath, key).unlink(missing_ok=True)
