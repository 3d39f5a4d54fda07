"""Start-up of `trainflow run`: Prefect's temporary API server boots in its own process (about 4 s on
2 cores) while this one imports the pipeline (torch, scikit-learn, MLflow, Optuna) and opens the
tracking database, instead of one after the other. With `PREFECT_API_URL` set there is nothing to boot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def prefect_api_booting() -> Iterator[None]:
    """Within the block, Prefect's temporary server (the one `get_client` would start on first use)
    boots in the background; leaving the block waits until it answers, so the flow finds it ready."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    failures: list[BaseException] = []

    def boot() -> None:
        try:
            SubprocessASGIServer().start()  # a process-wide singleton: get_client() reuses it
        except BaseException as exc:  # re-raised on the caller's thread below
            failures.append(exc)

    thread = threading.Thread(target=boot, name="prefect-api-boot", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failures:
        raise failures[0]
