"""`timeouts`: how long each stage may run before it is ended with an error (a stuck data source, a hung
collective, a search that will not finish). null = no limit, the default."""

from __future__ import annotations

from pydantic import Field

from trainflow.core.config.base import Section

_LIMIT = {"default": None, "gt": 0}


class TimeoutsConfig(Section):
    prepare_data: float | None = Field(**_LIMIT, description="Seconds the prepare_data stage may run; null = no limit.")
    lr_range_test: float | None = Field(**_LIMIT, description="Seconds the LR range test may run; null = no limit.")
    hpo_search: float | None = Field(
        **_LIMIT, description="Seconds the hyperparameter search may run (all its trials); null = no limit."
    )
    train: float | None = Field(
        **_LIMIT,
        description="Seconds the train stage may run; null = no limit. A timed-out training leaves its last "
        "checkpoint: raise the limit and re-run to resume.",
    )
    evaluate: float | None = Field(**_LIMIT, description="Seconds the evaluate stage may run; null = no limit.")
    compress: float | None = Field(
        **_LIMIT, description="Seconds the compress stage may run (every variant); null = no limit."
    )
    publish: float | None = Field(**_LIMIT, description="Seconds the publish stage may run; null = no limit.")

    def for_stage(self, stage: str) -> float | None:
        return getattr(self, stage, None)
