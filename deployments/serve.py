"""`trainflow serve`: the deployments of one or more configs, served from this process (no work pool):
flow runs start here in subprocesses, on the schedule, on the dataset event, or from the Prefect UI's
"Run" button. Stopping it (Ctrl-C) leaves the deployments active, so runs that come due meanwhile wait
(Scheduled / AwaitingConcurrencySlot) for the next `trainflow serve` instead of being lost.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from trainflow.core.config import load_config
from trainflow.core.errors import TrainflowError
from trainflow.deployments.definitions import ServeOptions, build_deployments, check_names


class PrefectServerError(TrainflowError):
    """No Prefect server that outlives this command."""


def require_prefect_server(command: str) -> str:
    """The API URL of a running Prefect server; deployments, schedules and events need one that stays up."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or ""
    if not url:
        raise PrefectServerError(
            f"{command}: needs a Prefect server that keeps running: start `trainflow ui` (or `prefect server start`) "
            "and export the PREFECT_API_URL it prints"
        )
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
            pass
    except OSError as exc:
        raise PrefectServerError(f"PREFECT_API_URL {url}: no Prefect server answers ({exc})") from None
    return url


def serve_configs(paths: list[Path], options: ServeOptions) -> int:
    """Validate every config, their names and the schedule first (one-line errors), then serve until interrupted."""
    configs = [(path, load_config(path, options.overrides)) for path in paths]
    options.check()
    check_names(paths)
    url = require_prefect_server("serve")
    deployments = build_deployments(configs, options)
    from prefect import serve

    for path, _ in configs:
        when = [f"cron {options.cron} ({options.timezone})"] if options.cron else []
        when += ["on trainflow.dataset.updated"] if options.trigger else []
        print(f"{path.stem}: {options.flow} flow, {', '.join(when) or 'on demand only'}; one run at a time")
    print(f"Prefect API {url}; Ctrl-C stops serving (the deployments stay, their runs wait)")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "trainflow")
    serve(*deployments, pause_on_shutdown=False, print_starting_message=False)
    return 0
