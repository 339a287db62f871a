"""A real redis-server for the tests: loopback, a free port, a temporary directory, no persistence.

Import the fixture a test module uses explicitly (`from tests.redis_server import
redis_server_fixture`); it is registered as `redis_server` and yields the server's URL. Tests
that need it are skipped, saying why, when the `redis-server` binary is not installed
(`.ci/run` installs Debian's).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import free_port

STARTUP_TIMEOUT = 10.0


def redis_binary() -> str:
    """The redis-server binary ($REDIS_SERVER, else on PATH or /usr/bin); skip if absent."""
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        pytest.skip(
            f"tests with Redis need redis-server: {path} not found (apt install redis-server)"
        )
    return path


class RedisServer:
    """One redis-server process, stopped with `stop`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The redis:// URL the app's REDIS_URL takes."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id (its CPU time is part of the bench's cost per reply)."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> RedisServer:
        """Start the server and wait until it accepts connections."""
        args = [
            redis_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer: {self.log()}")

    def log(self) -> str:
        """What the server logged."""
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def start_redis(workdir: Path) -> RedisServer:
    """Start a redis-server in `workdir` (created if need be); the caller stops it. Skips the
    test when there is no redis-server binary."""
    workdir.mkdir(parents=True, exist_ok=True)
    return RedisServer(workdir).start()


@pytest.fixture(name="redis_server", scope="module")
def redis_server_fixture(tmp_path_factory) -> Iterator[str]:
    """A redis-server for a module's tests; yields its URL."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(name="redis")
async def redis_client_fixture(redis_server):
    """An asyncio client of the module's redis-server, on an emptied database."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server)
    await client.flushdb()
    yield client
    await client.aclose()
