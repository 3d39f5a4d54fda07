"""`trainflow ui`: a Prefect server (API + UI) and an MLflow server on loopback, started together and
stopped together, so runs of `trainflow run` can be browsed.

    trainflow ui [--tracking-uri sqlite:///mlflow.db] [--artifacts DIR] [--prefect-database URL]
                 [--prefect-port 4200] [--mlflow-port 5000]

Prefect keeps its database in PREFECT_HOME, the one its temporary server used for earlier runs, so they
show up, unless `--prefect-database` names a PostgreSQL one. MLflow serves the given database (SQLite, or a
database server such as PostgreSQL); for SQLite, new experiments put their artifacts beside it (`mlruns/`),
where trainflow puts them itself, else in `--artifacts` (default ./mlartifacts). MLflow's GenAI job runner stays
off (7 more processes, ~1.6 GB) unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise. Each server runs in
its own process group, so Ctrl-C reaches this process only and it stops both groups, workers included.

Database URLs reach the servers through their environment (MLFLOW_BACKEND_STORE_URI,
PREFECT_SERVER_DATABASE_CONNECTION_URL), never their command lines, which `ps` shows to every user; `${VAR}`
references in them are resolved only there. Both databases are checked before either server starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from trainflow.core.config.secrets import mask_secrets, resolve
from trainflow.core.errors import TrainflowError
from trainflow.core.storage.databases import check_database, is_database, prefect_database_url
from trainflow.core.tracking.backend import artifacts_beside

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0  # both answer after 6-15 s on 2 cores; a busy machine or a slow database takes longer
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL for what is left of the process group


class ServerError(TrainflowError):
    """A UI server cannot start: its port is taken, it exited, or it did not answer in time."""


class StartCancelled(Exception):
    """SIGINT/SIGTERM arrived while the servers were starting."""


@dataclass(frozen=True)
class UiServers:
    """Both servers, answering. `pids` maps each server to its process id, also its process group id."""

    prefect_url: str
    mlflow_url: str
    tracking_uri: str  # passwords hidden (`core.config.secrets`): mask before showing
    artifacts: str
    prefect_database: str
    log_dir: Path
    pids: dict[str, int]
    _processes: dict[str, subprocess.Popen[bytes]] = field(repr=False)

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def exited(self) -> str | None:
        """A line naming a server whose process has exited on its own, else None."""
        for name, process in self._processes.items():
            if process.poll() is not None:
                return _failure(name, self.log_dir, f"exited with code {process.returncode}")
        return None


def run_ui(
    tracking_uri: str, prefect_port: int, mlflow_port: int, artifacts: str | None = None,
    prefect_database: str | None = None,
) -> int:  # fmt: skip
    """Start both servers, print where they are and how to report runs to them; on SIGINT/SIGTERM stop both."""
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ui_servers(tracking_uri, prefect_port, mlflow_port, cancel=stop, artifacts=artifacts,
                        prefect_database=prefect_database) as servers:  # fmt: skip
            print(f"Prefect UI  {servers.prefect_url}   ({mask_secrets(servers.prefect_database)})\n"
                  f"MLflow UI   {servers.mlflow_url}   ({mask_secrets(servers.tracking_uri)}; artifacts of new "
                  f"experiments: {servers.artifacts})\n"
                  f"logs        {servers.log_dir}  (prefect.log, mlflow.log)\n"
                  "To make `trainflow run` report to these servers, run it where these are set:\n"
                  f"export PREFECT_API_URL={servers.prefect_api_url}\n"
                  f"export MLFLOW_TRACKING_URI={servers.mlflow_url}\n"
                  "MLflow 3 opens on its GenAI side: pick 'Model training' in its sidebar for trainflow's runs.\n"
                  "Ctrl-C stops both.", flush=True)  # fmt: skip
            while not stop.wait(0.5):
                failure = servers.exited()
                if failure:
                    raise ServerError(failure)
        print("stopped both servers", flush=True)
    except StartCancelled:
        print("interrupted while starting; stopped both servers", flush=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


@contextmanager
def ui_servers(
    tracking_uri: str,
    prefect_port: int = 0,
    mlflow_port: int = 0,
    *,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
    cancel: threading.Event | None = None,
    artifacts: str | None = None,
    prefect_database: str | None = None,
) -> Iterator[UiServers]:
    """Start the Prefect and MLflow servers at once, yield when both answer HTTP, stop both on leaving.

    Args:
        tracking_uri: MLflow backend store, e.g. `sqlite:///mlflow.db` (not a server's http:// address).
        prefect_port, mlflow_port: ports on 127.0.0.1; 0 picks a free one.
        log_dir: where `prefect.log` and `mlflow.log` go (default: a new temporary folder).
        env: variables set for both servers on top of this process's (e.g. PREFECT_HOME).
        cancel: when set during start-up, stop both and raise `StartCancelled`.
        artifacts: the MLflow server's artifact root for experiments it creates (default: `mlruns/` beside an
            SQLite database, else `./mlartifacts`).
        prefect_database: the Prefect server's database (`postgresql://` is served through asyncpg); default:
            SQLite in PREFECT_HOME.

    Raises:
        ServerError: a port is taken or equal to the other, the URI is not a database, or a server
            exited or did not answer within `timeout_s` (the other is stopped too).
        ConfigError: a database server cannot be reached or refuses the login (before either server starts).
    """
    backend, artifact_root = _backend_store(tracking_uri, artifacts)
    prefect_db = prefect_database_url(prefect_database) if prefect_database else None
    if prefect_db is not None and is_database(prefect_db):
        check_database(prefect_db, "--prefect-database")
    prefect_port, mlflow_port = _ports(prefect_port, mlflow_port)
    logs = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="trainflow-ui-"))
    logs.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, **(env or {})}
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"

    prefect_env = {k: v for k, v in base.items() if k != "PREFECT_API_URL"}  # another server's, or ours of last time
    prefect_env.setdefault("PREFECT_UI_API_URL", f"{prefect_url}/api")  # else the UI follows a profile's API URL
    prefect_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if prefect_db is not None:
        prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = resolve(prefect_db, "--prefect-database")
    mlflow_env = dict(base)
    mlflow_env["MLFLOW_BACKEND_STORE_URI"] = resolve(backend, "--tracking-uri")  # `ps` shows arguments, not this
    mlflow_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI jobs: 7 more processes, ~1.6 GB
    artifact_flags = ["--default-artifact-root", artifact_root, "--artifacts-destination", artifact_root]

    commands = {
        "Prefect": ([*_tool("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port), "--ui"],
                    prefect_env, f"{prefect_url}/api/health"),
        "MLflow": ([*_tool("mlflow"), "server", *artifact_flags, "--host", HOST, "--port", str(mlflow_port),
                    "--workers", "1"], mlflow_env, f"{mlflow_url}/health"),
    }  # fmt: skip
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (command, server_env, _) in commands.items():
            with (logs / f"{name.lower()}.log").open("wb") as log_file:  # the child keeps its own copy
                processes[name] = subprocess.Popen(
                    command, env=server_env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        _wait_until_answering({name: health for name, (_, _, health) in commands.items()}, processes, logs,
                              timeout_s, cancel)  # fmt: skip
        pids = {name: process.pid for name, process in processes.items()}
        shown_db = prefect_db or f"SQLite in {base.get('PREFECT_HOME', '~/.prefect')}"
        yield UiServers(prefect_url, mlflow_url, backend, artifact_root, shown_db, logs, pids, processes)
    finally:
        stop_groups(list(processes.values()))


def _backend_store(uri: str, artifacts: str | None) -> tuple[str, str]:
    """The backend store URI to serve (a relative SQLite path made absolute; a database server checked) and the
    artifact root for new experiments: `artifacts`, else `mlruns/` beside an SQLite file, as trainflow's own
    experiments, else `./mlartifacts` (absolute)."""
    if uri.startswith(("http://", "https://")):
        raise ServerError(
            f"tracking URI {mask_secrets(uri)} is a server, not a database: trainflow ui serves a database itself; "
            "pass --tracking-uri sqlite:///mlflow.db (or unset MLFLOW_TRACKING_URI)"
        )
    if artifacts is not None and "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
    if not uri.startswith("sqlite:///"):
        if is_database(uri):
            check_database(uri, "--tracking-uri")
        return uri, artifacts or str(Path("mlartifacts").resolve())
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    if db.is_dir():
        raise ServerError(f"--tracking-uri: {db} is a folder, not an SQLite database file")
    if not db.parent.is_dir():
        raise ServerError(f"--tracking-uri: folder {db.parent} does not exist")
    return f"sqlite:///{db}", artifacts or str(artifacts_beside(uri))


def _ports(prefect_port: int, mlflow_port: int) -> tuple[int, int]:
    """The ports to use: given ones checked free on 127.0.0.1, 0 replaced by a free one (never the other)."""
    given = {"--prefect-port": prefect_port, "--mlflow-port": mlflow_port}
    if prefect_port and prefect_port == mlflow_port:
        raise ServerError(f"--prefect-port and --mlflow-port are both {prefect_port}; give them different ports")
    for flag, port in given.items():
        if port and not _is_free(port):
            raise ServerError(f"{flag} {port}: {HOST}:{port} is already in use; pick another port or 0 for a free one")
    with socket.socket() as a, socket.socket() as b:  # both bound at once, so the two differ
        a.bind((HOST, 0))
        b.bind((HOST, 0))
        return prefect_port or a.getsockname()[1], mlflow_port or b.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _tool(name: str) -> list[str]:
    """The command beside this Python (.venv/bin/prefect), else `python -m name`."""
    path = Path(sys.executable).parent / name
    return [str(path)] if path.exists() else [sys.executable, "-m", name]


def _wait_until_answering(
    health: dict[str, str],
    processes: dict[str, subprocess.Popen[bytes]],
    logs: Path,
    timeout_s: float,
    cancel: threading.Event | None,
) -> None:
    """Poll each server's health URL until it answers 200; a server that exits or stays silent is an error."""
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    waiting = dict(health)
    while True:
        for name, url in list(waiting.items()):
            process = processes[name]
            if process.poll() is not None:
                raise ServerError(_failure(name, logs, f"exited with code {process.returncode} on start"))
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        del waiting[name]
            except OSError:
                pass
        if not waiting:
            return
        if time.monotonic() > deadline:
            name = next(iter(waiting))
            raise ServerError(_failure(name, logs, f"did not answer {waiting[name]} in {timeout_s:g} s"))
        if cancel is None:
            time.sleep(0.25)
        elif cancel.wait(0.25):
            raise StartCancelled()


def _failure(name: str, logs: Path, what: str) -> str:
    """One line: which server, what happened, the last lines of its log and where the log is."""
    log = logs / f"{name.lower()}.log"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    tail = " | ".join(line[:200] for line in lines[-3:]) or "(log empty)"
    return f"{name} server {what}: {tail} (log: {log})"


def stop_groups(processes: list[subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each process's group (all at once), SIGKILL to what is left after `grace_s`; reap the leaders.
    Each process must lead its group (started with start_new_session)."""
    _signal_groups(processes, signal.SIGTERM)
    if not _groups_gone(processes, grace_s):
        _signal_groups(processes, signal.SIGKILL)
        _groups_gone(processes, grace_s)
    for process in processes:
        process.wait()


def _signal_groups(processes: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    for process in processes:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


def _groups_gone(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> bool:
    """Wait up to `timeout_s` until no process of the groups is left; True when none is."""
    deadline = time.monotonic() + timeout_s
    while True:
        for process in processes:
            process.poll()  # reap the leader, else it stays a zombie member
        if not any(group_members(process.pid) for process in processes):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc (Linux); elsewhere via killpg."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        return [group]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "(comm)": state ppid pgrp ...
        if int(pgrp) == group and state != "Z":
            members.append(int(entry.name))
    return members
