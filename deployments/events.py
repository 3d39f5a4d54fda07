"""The dataset event: `trainflow.dataset.updated` about the dataset's URI starts a run of every served
deployment whose config trains on it (`trainflow emit-dataset-updated URI`, or `prefect events emit`)."""

from __future__ import annotations

from typing import Any

from trainflow.core.data.sources import normalized_dataset_uri
from trainflow.deployments.definitions import DATASET_EVENT, dataset_resource_id
from trainflow.deployments.serve import require_prefect_server


def emit_dataset_updated(uri: str) -> Any:
    """Send the event to the Prefect server in PREFECT_API_URL and wait until it is delivered."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    require_prefect_server("emit-dataset-updated")
    normalized = normalized_dataset_uri(uri)
    event = emit_event(
        event=DATASET_EVENT,
        resource={"prefect.resource.id": dataset_resource_id(uri), "prefect.resource.name": normalized},
        payload={"uri": normalized},
    )
    EventsWorker.drain_all()
    return event
