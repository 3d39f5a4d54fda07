"""The deployments of a config: which flow, with which parameters, on which schedule and event.

Each config gets one deployment per flow, named after the config file (`training_pipeline/digits`,
`tune/digits`, ...). Its parameters are the config path, the `--set` overrides and an output folder.
It runs on a cron schedule when given one, and whenever `trainflow.dataset.updated` names the dataset the
config trains on. At most one run of a deployment is active at a time: the next one waits in
AwaitingConcurrencySlot until the slot frees, it is never dropped (ENQUEUE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainflow.core.config import Config
from trainflow.core.data.sources import dataset_uri, normalized_dataset_uri
from trainflow.core.errors import ConfigError
from trainflow.core.storage.version import code_version

DATASET_EVENT = "trainflow.dataset.updated"
RESOURCE_PREFIX = "trainflow.dataset."


def dataset_resource_id(uri: str) -> str:
    """The Prefect resource the dataset event is about: one id per dataset, however its path was written."""
    return RESOURCE_PREFIX + normalized_dataset_uri(uri)


def dataset_trigger(config: Config) -> Any:
    """Start a run when the event names this config's dataset."""
    from prefect.events import DeploymentEventTrigger

    uri = dataset_uri(config.data)
    return DeploymentEventTrigger(
        name=f"{DATASET_EVENT}: {uri}",
        expect={DATASET_EVENT},
        match={"prefect.resource.id": dataset_resource_id(uri)},
    )


def check_cron(cron: str, timezone: str) -> None:
    """A cron string and time zone Prefect accepts, else a one-line error naming the option."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = exc.errors()[0].get("msg", str(exc)).removeprefix("Value error, ")
        raise ConfigError(f"--cron {cron!r} --timezone {timezone}: {reason}") from None


def check_names(paths: list[Path]) -> None:
    """Deployments are named after their config file: two files of one name cannot both be served."""
    names = [path.stem for path in paths]
    if len(set(names)) < len(names):
        shared = ", ".join(sorted(str(path) for path in paths))
        raise ConfigError(f"configs: two files share a name ({shared}); deployments are named after it")


@dataclass(frozen=True)
class ServeOptions:
    """What every served config shares (`trainflow serve`'s options)."""

    flow: str = "pipeline"  # a key of flows.pipeline.FLOWS
    overrides: list[str] = field(default_factory=list)  # `--set` values, given to every run
    cron: str | None = None
    timezone: str = "UTC"
    trigger: bool = True  # run on trainflow.dataset.updated about the config's dataset
    out_dir: Path = Path("out")  # each config's runs write summary.json and the report to out_dir/<config name>

    def check(self) -> None:
        """One-line errors before anything is registered."""
        if self.cron is not None:
            check_cron(self.cron, self.timezone)


def build_deployments(configs: list[tuple[Path, Config]], options: ServeOptions) -> list[Any]:
    """RunnerDeployments of `options.flow` for each (config path, config)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from trainflow.flows.pipeline import FLOWS

    flow, cron = FLOWS[options.flow], options.cron
    deployments = []
    for path, config in configs:
        parameters = {"config_path": str(path.resolve()), "overrides": list(options.overrides),
                      "out_dir": str((options.out_dir / path.stem).resolve())}  # fmt: skip
        deployments.append(
            flow.to_deployment(
                name=path.stem,
                parameters=parameters,
                schedules=[Cron(cron, timezone=options.timezone)] if cron else None,
                triggers=[dataset_trigger(config)] if options.trigger else None,
                concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE"),
                description=f"{flow.description or options.flow} Config: {path}.",
                tags=["trainflow", path.stem],
                version=code_version(),
                entrypoint_type=EntrypointType.MODULE_PATH,  # runs from any folder: the package is installed
            )
        )
    return deployments
