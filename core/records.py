"""The base of every stage's result record: small, frozen, JSON-serialisable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from core.version import code_version


class StageResult(BaseModel):
    """What a stage hands to the next: numbers, names, reasons and artifact URIs, never tensors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def artifact_uris(self) -> list[str]:
        """URIs this record points to; a cached record whose artifacts are gone is recomputed."""
        return []

    def run_tags(self) -> dict[str, str]:
        """MLflow tags for the stage's run and the pipeline's parent run (e.g. the data fingerprint)."""
        return {}


def stage_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """Cache key of a stage run: its name, its inputs (config sections and upstream records) and the
    code version, so a change to any of them re-runs the stage and, through its record, those after it."""
    payload = {"stage": stage, "inputs": to_jsonable_python(dict(inputs)), "code": code_version()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{stage}-{digest[:24]}"
