"""Config of the training doctor (`train.diagnostics`): per-layer statistics on a schedule, and the rules that
turn them and the loop's own signals into findings with a remedy (docs/doctor.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainflow.core.config.base import Section


class DiagnosticsConfig(Section):
    enabled: bool = Field(
        True,
        description="Watch the training and report findings (each names the rule, the layer, the step, the figure and a remedy).",
    )
    every_steps: int = Field(
        50,
        ge=1,
        description="Optimizer steps between two per-layer measurements (activation mean, std and share near zero; gradient norm; update/weight ratio), the first at step 1. Unmeasured steps pay nothing; 50 keeps the cost under 1% (benchmarks/trainer_overhead.py).",
    )
    on_finding: Literal["warn", "stop"] = Field(
        "warn",
        description="warn = log each finding and go on; stop = end the fit at the first new finding with it as the reason (the train stage fails; a re-run resumes from the checkpoint, the findings already reported do not stop it again).",
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
        description="Steps over which a unit must never activate to count as dead, and over which a plateau is judged.",
    )
    data_wait_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of training time waiting for the loader above which the loop is loader-bound (three log windows in a row, the fit's first one left out).",
    )
    saturated_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A tanh or sigmoid whose share of outputs within 0.01 of its bounds exceeds this is saturated.",
    )
    vanishing_ratio: float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="A layer among the first third whose gradient RMS is below this times the median layer's, at two measurements in a row, has vanishing gradients.",
    )
    lr_factor: float = Field(
        10.0,
        gt=1,
        description="The LR used is far from the LR range test's suggestion when more than this factor above or below it.",
    )
