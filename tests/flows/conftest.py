"""One Prefect test server for the whole session (it takes ~18 s to start)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The harness does not isolate default result storage; our stages set theirs, other tasks must not leak.
    settings = {PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield
