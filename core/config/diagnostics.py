"""Config of the training doctor (`train.diagnostics`): per-layer statistics on a schedule, and the rules that
turn them and the loop's own signals into findings with a remedy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainflow.core.config.base import Section


class DiagnosticsConfig(Section):
    enabled: bool = Field(
        True,
        description="Watch the training and report findings (each names the layer, the step, the figure and a remedy).",
    )
    every_steps: int = Field(
        50,
        ge=1,
        description="Optimizer steps between two per-layer measurements (activation mean, std and share near zero; gradient norm; update/weight ratio). 50 keeps the cost within 3% (benchmarks/trainer_overhead.py).",
    )
    on_finding: Literal["warn", "stop"] = Field(
        "warn",
        description="warn = log each finding and go on; stop = end the fit at the first finding with it as the reason (resumable after a fix).",
    )
    in_search: bool = Field(
        False,
        description="Also watch HPO trials and the LR range test (off: they are short and the range test diverges on purpose).",
    )
    dead_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A layer whose share of units that never activated over the window exceeds this is dead.",
    )
    window_steps: int = Field(
        200,
        ge=1,
        description="Steps over which a unit must never activate to count as dead, and over which a plateau or a growing gap is judged.",
    )
    data_wait_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of training time waiting for the loader above which the loop is loader-bound.",
    )
