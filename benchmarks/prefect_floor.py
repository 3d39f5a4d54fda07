"""Prefect's own floor for `benchmarks/cached_rerun.py`: a trivial 7-task flow on the temporary API server,
as a user would write it. `--fast-exit` leaves the way `trainflow` does (after Python's own shutdown steps,
without the interpreter's module teardown), to show what that part is worth on its own."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

from prefect import flow, task


@task
def step(i: int) -> int:
    return i


@flow
def trivial() -> None:
    for i in range(7):  # one per stage of the pipeline, prepare_data to publish
        step(i)


if __name__ == "__main__":
    trivial()
    if "--fast-exit" in sys.argv:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
