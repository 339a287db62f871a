"""Many processes on one database: they start together safely (the schema is migrated once,
one session key is made), and `WORKERS` > 1 needs `REDIS_URL`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from chat.migrations import MIGRATIONS
from tests.live import ROOT

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
