"""A real PostgreSQL server for the tests: initdb in a temporary directory, loopback, a free port.

`start_postgres(directory)` runs Debian's `initdb` and `postgres` (the newest version under
/usr/lib/postgresql, or $PG_BIN) and returns `(url, stop)`. The session-scoped fixture
`postgres_server` (registered in tests/conftest.py) yields one server's base URL for the whole
run, and `fresh_database_url(base_url)` gives each test an empty schema of its own on it, so a
test gets a clean Postgres store for the price of one `create schema`. Tests that need Postgres
are skipped, saying why, only when the binaries are not installed (`apt install postgresql`).

The server is for tests only: trust authentication on 127.0.0.1, no fsync, no Unix socket
outside its own directory.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

STARTUP_TIMEOUT = 30.0
PG_ROOT = Path("/usr/lib/postgresql")
USER = "chat"


def postgres_bin() -> Path | None:
    """The directory with initdb and postgres: $PG_BIN, else the newest Debian version's."""
    if os.environ.get("PG_BIN"):
        path = Path(os.environ["PG_BIN"])
        return path if (path / "postgres").exists() else None
    if not PG_ROOT.is_dir():
        return None
    versions = sorted(
        (p for p in PG_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)),
        key=lambda p: tuple(int(x) for x in p.name.split(".")),
    )
    for version in reversed(versions):
        if (version / "bin" / "postgres").exists() and (version / "bin" / "initdb").exists():
            return version / "bin"
    return None


def _unprivileged() -> dict:
    """Subprocess arguments that drop root: initdb and postgres refuse to run as root (as in
    a CI container), so there they run as the `postgres` account (else `nobody`)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root and no 'postgres' or 'nobody' account to run postgres as")


def _die_with_parent() -> None:
    """In the server process: end when the test process ends, even killed (no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int) -> bool:

    try:
        with psycopg.connect(
            f"postgresql://{USER}@127.0.0.1:{port}/postgres", connect_timeout=2
        ) as conn:
            conn.execute("select 1")
        return True
    except psycopg.OperationalError:
        return False


def start_postgres(directory: Path) -> tuple[str, Callable[[], None]]:
    """Start a PostgreSQL server with its data in `directory`; return (base URL, stop).

    The base URL names the database `postgres` as the superuser `chat`; `stop` shuts the
    server down (fast, then immediate) and may be called more than once.
    """
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL binaries not found under /usr/lib/postgresql")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "postgres.log"
    drop = _unprivileged()
    if drop:
        # pytest's temporary directories are root's own (0700): the server's files go in a
        # directory of its account's, removed by `stop`.
        run_dir = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        os.chown(run_dir, drop["user"], drop["group"])
    else:
        run_dir = directory
    data = run_dir / "data"
    with log_path.open("ab") as log:
        subprocess.run(
            [
                str(bindir / "initdb"),
                "--pgdata", str(data),
                "--username", USER,
                "--auth", "trust",
                "--encoding", "UTF8",
                # C collation (byte order, as SQLite compares text) with UTF-8 character
                # classes, so search folds the case of every letter, as SQLite's does.
                "--lc-collate", "C",
                "--lc-ctype", "C.UTF-8",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
            **drop,
        )  # fmt: skip
    port = _free_port()
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D", str(data),
            "-p", str(port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={run_dir}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            "-c", "shared_buffers=32MB",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        **drop,
    )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends every session
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        if run_dir != directory:
            shutil.rmtree(run_dir, ignore_errors=True)

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _ready(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"postgres did not start: {log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    return f"postgresql://{USER}@127.0.0.1:{port}/postgres", stop


def fresh_database_url(base_url: str) -> str:
    """A URL on the server of `base_url` whose connections use a new, empty schema.

    The schema is named at random and put first on the search path (`options=-csearch_path=`),
    so every table, index and text search configuration the store creates lands in it.
    """

    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"create schema {schema}")
    scheme, netloc, path, query, fragment = urlsplit(base_url)
    params = [(k, v) for k, v in parse_qsl(query) if k != "options"]
    params.append(("options", f"-csearch_path={schema}"))
    return urlunsplit((scheme, netloc, path, urlencode(params), fragment))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[str]:
    """One PostgreSQL server for the whole test run; yields its base URL."""
    if postgres_bin() is None:
        pytest.skip(
            "tests with PostgreSQL need its server binaries: none under /usr/lib/postgresql "
            "(apt install postgresql) and PG_BIN unset"
        )
    url, stop = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield url
    finally:
        stop()
