"""A real PostgreSQL server for tests: a throwaway cluster (Debian's postgresql-15 binaries, `make system-deps`)
initialised into a temporary folder, on a free loopback port, with scram-sha-256 passwords; removed afterwards.

Import the fixture into a test module: `from tests.postgres import postgres  # noqa: F401`. Tests that need the
server skip only when its binaries are missing (CI installs them; a test never installs anything).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

USER, PASSWORD = "tf", "pg-Pa55word-planted-7f3c1e"  # the tests grep for this password: it is recognisable


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian keeps them off PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """One cluster: `start()`, `create_database(name)`, `url(database)`, `dump(database)`, `stop()`."""

    def __init__(self, root: Path, user: str = USER, password: str = PASSWORD):
        self.bin = server_binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (make system-deps)")
        self.root, self.user, self.password = root, user, password
        self.data, self.socket_dir = root / "data", root / "sock"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0  # initdb refuses root: run the server as the postgres user

    def _run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        command = [*(["runuser", "-u", "postgres", "--"] if self._as_postgres else []), *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def start(self) -> PostgresCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")  # fmt: skip
        pwfile.unlink()
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip
        return self

    def stop(self) -> None:
        subprocess.run([*(["runuser", "-u", "postgres", "--"] if self._as_postgres else []),
                        str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip

    def url(self, database: str = "postgres", scheme: str = "postgresql", password: str | None = None) -> str:
        return f"{scheme}://{self.user}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password}

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL (with the password)."""
        self._client("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def databases(self) -> list[str]:
        out = self._client("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
                           "-At", "-c", "SELECT datname FROM pg_database WHERE NOT datistemplate")  # fmt: skip
        return out.split()

    def set_password(self, password: str) -> None:
        """Rotate the user's password (connections open with the old one stay open)."""
        self._client("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres", "-c",
                     f"ALTER ROLE {self.user} PASSWORD '{password}'")  # fmt: skip
        self.password = password

    def dump(self, database: str) -> bytes:
        """`pg_dump` of one database as plain SQL: long values are stored compressed, so grep a dump, not files."""
        return self._client("pg_dump", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, database).encode()

    def _client(self, tool: str, *args: str) -> str:
        result = subprocess.run([str(self.bin / tool), *args], check=True, capture_output=True, text=True,
                                env=self._env(), timeout=120)  # fmt: skip
        return result.stdout


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the session (initdb + start take ~2 s); tests create their own databases."""
    if server_binaries() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (make system-deps)")
    root = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))
    cluster = PostgresCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    """Poll `predicate()` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout:g} s")
        time.sleep(0.2)
