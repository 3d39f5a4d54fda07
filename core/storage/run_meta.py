"""How a pipeline run presents itself in MLflow: its source and its dataset inputs (in progress)."""

from __future__ import annotations

from typing import Any

from core.records import PrepareDataResult


def source_tags(config_path: str) -> dict[str, str]:
    return {}


def log_dataset_input(client: Any, run_id: str, data: PrepareDataResult) -> None:
    """Placeholder until dataset inputs land."""
