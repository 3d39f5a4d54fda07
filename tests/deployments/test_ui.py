"""`trainflow ui` as a user runs it: a real subprocess in an empty folder, real servers, a real SIGINT."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployments.processes import PYTHON, alive, cli_env, descendants, groups_alive
from trainflow.core.tracking.runs import Tracker
from trainflow.deployments.servers import ServerError, ui_servers

pytestmark = pytest.mark.slow  # two servers started and stopped: left out of `pytest -m 'not slow'`

STARTUP_S, STOP_S = 120, 30


def http_get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.status, response.read()


def http_post(url: str, body: dict[str, object]) -> dict[str, object]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


def read_until(process: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    """stdout lines up to the one containing `marker` (fails with what was printed if it does not come)."""
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if marker in line:
            return seen
    pytest.fail(f"no {marker!r} from trainflow ui within {timeout_s} s; printed: {seen}")


@pytest.fixture
def existing_run(tmp_path: Path) -> tuple[str, str]:
    """A run logged straight to the SQLite file before any server runs, with one artifact (as `trainflow run`
    logs without a server): its artifacts sit in mlruns/ beside the database."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.for_experiment(uri, "before-the-ui")
    run_id = tracker.client.create_run(tracker.experiment_id, run_name="earlier").info.run_id
    note = tmp_path / "hello.txt"
    note.write_text("logged before the server started")
    tracker.client.log_artifact(run_id, str(note), "notes")
    return uri, run_id


@pytest.fixture
def ui(tmp_path: Path, existing_run: tuple[str, str]) -> Iterator[subprocess.Popen[str]]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = cli_env(tmp_path, TMPDIR=str(tmp_path))  # its log folder lands in tmp_path
    process = subprocess.Popen(
        [PYTHON, "-m", "trainflow", "ui", "--tracking-uri", existing_run[0]],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield process
    if process.poll() is None:  # the test failed before stopping it: do not leave servers behind
        process.send_signal(signal.SIGINT)
        process.wait(STOP_S)


def test_ui_serves_both_uis_and_sigint_stops_every_process(
    ui: subprocess.Popen[str], tmp_path: Path, existing_run: tuple[str, str]
) -> None:
    printed = "\n".join(read_until(ui, "Ctrl-C", STARTUP_S))
    prefect = re.search(r"^export PREFECT_API_URL=(http://127\.0\.0\.1:\d+)/api$", printed, re.MULTILINE)
    mlflow = re.search(r"^export MLFLOW_TRACKING_URI=(http://127\.0\.0\.1:\d+)$", printed, re.MULTILINE)
    assert prefect and mlflow, printed
    assert f"Prefect UI  {prefect.group(1)}" in printed and f"MLflow UI   {mlflow.group(1)}" in printed
    logs = re.search(r"^logs +(\S+)", printed, re.MULTILINE)
    assert logs and Path(logs.group(1)).parent == tmp_path, printed
    assert (Path(logs.group(1)) / "mlflow.log").is_file()

    assert http_get(f"{prefect.group(1)}/api/health") == (200, b"true")
    status, page = http_get(prefect.group(1))  # the UI, not only the API
    assert status == 200 and b"<html" in page.lower()
    assert http_get(f"{mlflow.group(1)}/health") == (200, b"OK")
    _, run_id = existing_run
    status, content = http_get(f"{mlflow.group(1)}/get-artifact?path=notes/hello.txt&run_uuid={run_id}")
    assert (status, content) == (200, b"logged before the server started")  # what the UI's artifact view fetches
    created = http_post(f"{mlflow.group(1)}/api/2.0/mlflow/experiments/create", {"name": "through-the-server"})
    _, body = http_get(f"{mlflow.group(1)}/api/2.0/mlflow/experiments/get?experiment_id={created['experiment_id']}")
    location = json.loads(body)["experiment"]["artifact_location"]
    assert location == (tmp_path / "mlruns" / str(created["experiment_id"])).as_uri()  # beside the database too

    servers = descendants(ui.pid)
    groups = {pid for pid in servers if os.getpgid(pid) == pid}
    assert len(servers) >= 3 and len(groups) == 2, servers  # prefect, mlflow (+ its uvicorn worker)

    ui.send_signal(signal.SIGINT)
    assert ui.wait(STOP_S) == 0, ui.stderr.read() if ui.stderr else ""
    assert alive(servers) == set()
    assert groups_alive(groups) == {}
    for port in (prefect.group(1), mlflow.group(1)):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(port.rsplit(":", 1)[1]))) != 0


def test_a_port_in_use_is_one_error_line_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [PYTHON, "-m", "trainflow", "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--prefect-port", str(port)],
            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: --prefect-port {port}: 127.0.0.1:{port} is already in use; pick another port or 0 for a free one"
    ]
    assert not (tmp_path / "prefect-home").exists()


def test_a_server_that_fails_to_start_is_named_with_its_log_and_the_other_is_stopped(tmp_path: Path) -> None:
    earlier_children = descendants(os.getpid())  # e.g. the session's Prefect test server
    failed = r"^MLflow server exited with code \d+ on start: .+ \(log: .+mlflow\.log\)$"
    with (
        pytest.raises(ServerError, match=failed),
        ui_servers("nosuchdb://nowhere", log_dir=tmp_path / "logs", env=cli_env(tmp_path)),
    ):
        pytest.fail("MLflow has no store for this scheme (whatever database drivers are installed)")
    assert alive(descendants(os.getpid()) - earlier_children) == set()  # the Prefect server was stopped too
    assert (tmp_path / "logs" / "prefect.log").is_file()
