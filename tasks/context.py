"""What every stage task gets besides its inputs: where to log and where to store (never part of its cache key)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict

from trainflow.core.config import StoreConfig
from trainflow.core.errors import StageNotCachedError
from trainflow.core.records import StageResult
from trainflow.core.tracking.runs import RunLogger, Tracker, flatten


class StageContext(BaseModel):
    model_config = ConfigDict(frozen=True)
    store: StoreConfig  # local paths absolute (`core.storage.store.resolved`): every stage opens the same store
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    name: str = "pipeline"  # the config's name (file stem): Prefect artifact keys, messages
    reuse_only: frozenset[str] = frozenset()  # stages that may only come from the cache (compress-publish flow)
    join_key: str | None = None  # how `trainflow tune-worker` finds this run's study (core.tuning.join.join_key)

    @property
    def store_uri(self) -> str:
        return self.store.uri


@contextmanager
def stage_run(
    ctx: StageContext, stage: str, params: Mapping[str, Any], run_id: str | None = None
) -> Iterator[RunLogger]:
    """The stage's MLflow child run of the pipeline's (`Tracker.run`: params first, ended FINISHED, or
    FAILED/KILLED with the error); `run_id` re-opens an earlier one (a resumed training)."""
    if stage in ctx.reuse_only:
        raise StageNotCachedError(
            f"{stage}: no cached result for these inputs, and this flow only re-uses it; run the pipeline (or the "
            f"train flow) for {ctx.name} first"
        )
    tracker = Tracker(ctx.tracking_uri, ctx.experiment_id)
    with tracker.run(stage, ctx.parent_run_id, flatten(params), run_id=run_id) as run:
        yield run


def log_result(run: RunLogger, result: StageResult) -> None:
    """The record as `result.json`, its tags, and its top-level numbers as metrics."""
    data = json.loads(result.model_dump_json())
    run.log_dict(data, "result.json")
    run.set_tags(result.run_tags())
    numbers = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if numbers:
        run.log_metrics(numbers, step=0)
