"""Prefect task standing in for a stage that nothing needs, so the UI shows it Skipped instead of absent."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State


@task(name="skipped", cache_policy=NO_CACHE)
def skipped_stage(reason: str) -> State[None]:
    """Ends in a Completed state named Skipped, with the reason as its message."""
    return Completed(name="Skipped", message=reason)
