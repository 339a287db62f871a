"""A real Redis for the tests: Debian's `redis-server` on a free loopback port, in a temp dir,
with nothing saved to disk. Tests skip, saying why, only when the binary is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 10.0


@dataclass
class RedisServer:
    """A running redis-server: its URL, and how to stop it."""

    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        """The `REDIS_URL` that reaches it."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (its CPU time is part of the bench's cost per reply)."""
        return self.proc.pid

    def stop(self) -> None:
        """Stop the server and wait for it to go."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def redis_binary() -> str | None:
    """Where redis-server is, or None."""
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp_path: Path) -> RedisServer:
    """Start a redis-server in `tmp_path` on a free 127.0.0.1 port; skip the test if there is
    no redis-server binary. The caller stops it (`server.stop()`)."""
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    tmp_path.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a port taken between choosing and binding: choose again
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(tmp_path),
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "yes",
                "--logfile", str(tmp_path / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return RedisServer(proc, port)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
    raise RuntimeError(f"redis-server did not start; see {tmp_path / 'redis.log'}")
