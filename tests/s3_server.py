"""A real S3 endpoint for tests: moto's server on loopback (boto3 talks HTTP to it, nothing is mocked
in-process), fake credentials in the environment, and a TCP proxy that breaks connections on purpose.

Import the fixtures into a test module: `from tests.s3_server import s3_endpoint  # noqa: F401`.
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FOREIGN = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def isolate_aws_env(mp: pytest.MonkeyPatch, credentials: dict[str, str] | None = CREDENTIALS) -> None:
    """boto3's credential chain sees only `credentials` (none: no credentials at all), never this machine's."""
    for name in (*FOREIGN, *CREDENTIALS):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name, value in (credentials or {}).items():
        mp.setenv(name, value)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """http://127.0.0.1:<port> of a moto S3 server for the session, with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        isolate_aws_env(mp)
        yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client on the server, to look at what the store did."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def new_bucket(endpoint: str, name: str) -> str:
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def free_port() -> int:
    """A loopback port nothing listens on (closed right after it was picked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FaultProxy:
    """Forwards loopback TCP to `upstream`; a `fault_rate` share of the connections is reset (RST) or
    stalled (no more bytes either way) after a random number of relayed bytes, so requests die mid-header,
    mid-body or mid-answer."""

    def __init__(self, upstream: str, fault_rate: float = 0.3, seed: int = 0):
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.fault_rate = fault_rate
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._server.close()

    def _plan(self) -> tuple[str | None, int]:
        with self._lock:
            self.stats["connections"] += 1
            if self._rng.random() >= self.fault_rate:
                return None, 0
            kind = self._rng.choice(["reset", "stall"])
            self.stats["faulty"] += 1  # most die within a request's first bytes, some mid-part (up to 6 MiB in)
            budget = self._rng.randrange(4096) if self._rng.random() < 0.7 else self._rng.randrange(6 << 20)
            return kind, budget

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._relay, args=(client, *self._plan()), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, fault: str | None, budget: int) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        peers = {client: upstream, upstream: client}
        relayed = 0
        with selectors.DefaultSelector() as sel:
            for sock in peers:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                if fault and relayed >= budget:
                    self._fault(fault, client)
                    break
                events = sel.select(timeout=0.2)
                done = False
                for key, _ in events:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(1 << 16)
                        if data:
                            peers[sock].setblocking(True)
                            peers[sock].sendall(data)
                            peers[sock].setblocking(False)
                    except OSError:
                        data = b""
                    relayed += len(data)
                    done = done or not data
                if done:
                    break
        for sock in peers:
            sock.close()

    def _fault(self, kind: str, client: socket.socket) -> None:
        with self._lock:
            self.stats[kind] += 1
        if kind == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self._stop.wait(30)  # nothing moves until the client gives up (its read timeout) or the proxy stops


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the moto server: 30% faulty connections, seeded (FAULT_SEED=n tries others)."""
    proxy = FaultProxy(s3_endpoint, fault_rate=0.3, seed=int(os.environ.get("FAULT_SEED", "7")))
    yield proxy
    proxy.close()
