"""The run report: report.md and a self-contained report.html of one pipeline run (in progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import Config


def write_report(summary: dict[str, Any], config: Config, out_dir: Path | None, client: Any, run_id: str) -> None:
    """Placeholder until the report lands: writes nothing."""
