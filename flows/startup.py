"""Start-up of `trainflow run`: Prefect's temporary API server boots in its own process (about 4 s on
2 cores) while this one imports the pipeline (Prefect, torch, MLflow; each stage's own libraries load when
it runs) and opens the tracking database, instead of one after the other. With `PREFECT_API_URL` set there
is nothing to boot.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from trainflow.core.config import Config


@contextmanager
def prefect_api_booting() -> Iterator[Callable[[], bool]]:
    """Within the block, Prefect's temporary server (the one `get_client` would start on first use)
    boots in the background; leaving the block waits until it answers, so the flow finds it ready.
    The block gets `booting()`: true until the server answers (false at once when there is none to boot)."""
    server = _temporary_server()
    if server is None:
        yield lambda: False
        return
    failures: list[BaseException] = []

    def boot() -> None:
        try:
            server.start()  # a process-wide singleton: get_client() reuses it
        except BaseException as exc:  # re-raised on the caller's thread below
            failures.append(exc)

    thread = threading.Thread(target=boot, name="prefect-api-boot", daemon=True)
    thread.start()
    try:
        yield thread.is_alive
    finally:
        thread.join()
    if failures:
        raise failures[0]


def _temporary_server() -> Any | None:
    """The server `get_client` would boot, or None when it boots none (an API URL is set, the temporary
    server is disabled) or Prefect no longer has the class (then it boots as usual, at first use)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return None
    return SubprocessASGIServer()


def warm_up(config: Config, config_name: str, booting: Callable[[], bool]) -> None:
    """First-use costs a run would otherwise pay inside its stages, paid while the server boots: the tracking
    database's schema check and experiment (the flow needs them first thing), and, only while the server is
    still booting, the import of torch._dynamo that torch defers to the first optimizer it builds (about
    1.3 s here): where it overlaps nothing, it is left to the first stage that trains, so a fully cached run
    never pays it. A search with worker processes gets their server started (`start_worker_server`): its
    imports (~4 s of CPU in its own process) overlap the boot, prepare_data and the LR range test."""
    from trainflow.core.tracking.runs import Tracker
    from trainflow.core.training.optim import import_optimizer_dependencies

    hpo = config.tune.hpo
    if hpo.enabled and min(hpo.parallelism, hpo.n_trials) > 1:
        from trainflow.core.tuning.hpo_worker import start_worker_server

        start_worker_server()
    Tracker.for_config(config, config_name)
    if booting():
        import_optimizer_dependencies()
