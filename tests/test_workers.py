"""Many processes on one database: they start together safely (the schema is migrated once,
one session key is made), and `WORKERS` > 1 needs `REDIS_URL`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from chat.migrations import MIGRATIONS
from tests.live import _APP_ENV, ROOT, free_port
from tests.redis_server import start_redis

# One interpreter imports the app once, then for each round forks PROCESSES children that block
# on a pipe until all exist, so they open the fresh database within a millisecond or two of each
# other: the race as `--workers N` meets it, many times over, without paying for N imports each.
_RACE = textwrap.dedent(
    """
    import json, os, sys, traceback
    from chat.config import Settings
    from chat.store import ChatStore
    root, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for r in range(rounds):
        db = os.path.join(root, f"round{r}", "chat.db")
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        kids = []
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.read(go_r, 1)
                    key = Settings.from_env({"DB_PATH": db}).secret_key
                    ChatStore(db).close()
                    line = key
                except BaseException:
                    line, code = "ERROR " + traceback.format_exc().strip().splitlines()[-1], 1
                os.write(out_w, (line + "\\n").encode())
                os._exit(code)
            kids.append(pid)
        os.write(go_w, b"x" * n)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
        os.close(out_w)
        lines = os.read(out_r, 1 << 16).decode().splitlines()
        print(json.dumps({"db": db, "codes": codes, "lines": lines}), flush=True)
    """
)
PROCESSES = 6
ROUNDS = 10


@pytest.mark.slow
def test_processes_started_together_on_a_fresh_database_all_come_up(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", _RACE, str(tmp_path), str(PROCESSES), str(ROUNDS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rounds = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rounds) == ROUNDS
    for r in rounds:
        errors = [line for line in r["lines"] if line.startswith("ERROR")]
        assert not errors and r["codes"] == [0] * PROCESSES, errors
        # One session key, the same for all: a cookie signed by one worker is good on another.
        assert len(set(r["lines"])) == 1
        with sqlite3.connect(r["db"]) as conn:
            names = [row[0] for row in conn.execute("select name from _migrations")]
            assert names == [fn.__name__ for fn in MIGRATIONS]  # every step, each once
            assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"


def _app_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _APP_ENV and k != "REDIS_URL"}
    env.update(
        HOST="127.0.0.1", DB_PATH=str(tmp_path / "chat.db"), MODEL="", NO_PROXY="127.0.0.1", **extra
    )
    return env


def test_more_than_one_worker_without_redis_is_refused_in_one_line(tmp_path):
    for args, env in ((["--workers", "2"], {}), ([], {"WORKERS": "3"})):
        done = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *args],
            cwd=tmp_path,
            env=_app_env(tmp_path, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "REDIS_URL" in lines[0] and "WORKERS" in lines[0], lines
        assert not (tmp_path / "chat.db").exists()  # refused before opening anything


def _workers_of(parent: int) -> list[int]:
    """The worker processes a uvicorn supervisor started (spawned interpreters)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_workers_with_redis_serve_one_database_and_stop_cleanly(tmp_path):
    server = start_redis(tmp_path / "redis")
    port = free_port()
    log = tmp_path / "app.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "--workers", "2", "--port", str(port)],
                cwd=tmp_path,
                env=_app_env(tmp_path, REDIS_URL=server.url),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 90
            with httpx.Client(trust_env=False, timeout=5) as http:
                while len(_workers_of(proc.pid)) < 2 or not _answers(http, port):
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                workers = _workers_of(proc.pid)
                # Both workers finish starting (each runs its lifespan on the one database).
                while log.read_text().count("Application startup complete") < 2:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                for _ in range(10):  # new connections, spread over the workers by the kernel
                    assert http.get(f"http://127.0.0.1:{port}/ready").json() == {"ready": True}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
        text = log.read_text()
        assert text.count("Application shutdown complete") == 2 and "Traceback" not in text, text
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        with sqlite3.connect(tmp_path / "chat.db") as conn:
            names = [row[0] for row in conn.execute("select name from _migrations")]
        assert names == [fn.__name__ for fn in MIGRATIONS]
    finally:
        server.stop()


def _answers(http: httpx.Client, port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return http.get(f"http://127.0.0.1:{port}/health").status_code == 200
    return False


def test_a_starting_worker_leaves_other_workers_replies_alone(make_client, settings, tmp_path):
    """One process: a reply left 'streaming' at start was cut off by a crash, and is marked so.
    With Redis, another worker may be writing it now; a start must not mark it."""
    from pydantic_ai.messages import ModelRequest, UserPromptPart

    from chat.stores import open_store
    from tests.conftest import connect_db

    store = open_store(settings)
    conv = store.create_conversation("someone")
    turn = store.add_turn(
        conv["id"], "hi", [ModelRequest(parts=[UserPromptPart("hi")])], model="demo"
    )
    store.close()

    def status() -> str:
        with connect_db(settings) as conn:
            return conn.execute("select status from turns where id = ?", [turn["id"]]).fetchone()[0]

    server = start_redis(tmp_path / "redis")
    try:
        make_client(redis_url=server.url)  # a second worker starting beside a live one
        assert status() == "streaming"
    finally:
        server.stop()
    make_client()  # one process, after a crash
    assert status() == "interrupted"
