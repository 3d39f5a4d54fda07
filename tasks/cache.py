"""Cross-run stage caching on Prefect's own cache: `Cached` states in the UI, records in the store.

The key is `core.records.stage_key` over the task's inputs (every argument but `ctx`) and the
code version. Records are JSON files in `<store>/.cache/prefect/`, beside the artifacts they
point to: a folder for a local store, objects in the bucket for an s3:// store (`tasks.store_results`),
so any machine pointed at the same store reuses them. A record whose artifacts are gone is deleted
before the lookup, so the stage re-runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem

from trainflow.core.config import Config, StoreConfig
from trainflow.core.records import StageResult, stage_key
from trainflow.core.storage.store import ArtifactStore, open_store
from trainflow.tasks.store_results import RECORDS, StoreResultStorage, saved_result_storage

log = logging.getLogger(__name__)

UNKEYED = ("ctx",)  # run context (tracking ids, store location): where a stage logs, not what it computes


@dataclass
class StageCachePolicy(CachePolicy):
    stage: str = ""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        key = stage_key(self.stage, keyed(inputs))
        _evict_if_stale(task_ctx, key, inputs["ctx"].store)
        return key


def keyed(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs that make a stage's cache key: all but the run context, with `store.cache_dir` of a whole
    config blanked (a machine's local folder, not what the stage computes), so machines sharing a store
    share its records."""
    out = {}
    for name, value in inputs.items():
        if name in UNKEYED:
            continue
        if isinstance(value, Config):
            value = value.model_copy(update={"store": value.store.model_copy(update={"cache_dir": ""})})
        out[name] = value
    return out


def stage_cache(stage: str) -> dict[str, Any]:
    """`@task` options for a cached stage (the flow points result storage at the run's store)."""
    return {
        "name": stage,
        "cache_policy": StageCachePolicy(stage=stage),
        "persist_result": True,
        "result_serializer": "json",
    }


def result_storage(store: StoreConfig) -> Path | StoreResultStorage:
    """Where stage records are persisted: in the store, beside the artifacts they point into (a folder
    inside a local store; objects under `<prefix>/.cache/prefect/` for an s3:// store)."""
    if store.uri.startswith("s3://"):
        return saved_result_storage(store)
    return open_store(store).workdir(RECORDS)


def current_stage_key(stage: str) -> str:
    """The running task's cache key, to name the store folder of its outputs."""
    ctx = TaskRunContext.get()
    assert ctx is not None and ctx.parameters is not None, "only inside a stage task"
    return stage_key(stage, keyed(ctx.parameters))


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
    if not missing:
        return
    log.warning("%s: cached result points to missing artifacts (%s); recomputing", key, missing[0])
    storage = results.result_storage
    if isinstance(storage, StoreResultStorage):
        storage.delete_path(key)
    elif isinstance(storage, LocalFileSystem):
        Path(storage.basepath, key).unlink(missing_ok=True)
