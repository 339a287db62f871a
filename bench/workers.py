"""One worker against two (with Redis), on the same loads: is a second worker worth its cost?

    uv run python bench/workers.py                      # both modes, both loads (~6 min on 2 cores)
    uv run python bench/workers.py --modes 1            # one worker only (no Redis needed)
    uv run python bench/workers.py --modes 2 --loads burst

Loads (the same for both modes):
- `throughput`: 100 users at once x 300 tokens at full speed (bench/run.py's throughput).
- `burst`: 100 users at once each sending a first message with a short reply (30 tokens): what
  matters is how soon the first token shows (TTFT), with every worker taking its share.

Modes: `1` is `python main.py` as shipped (one process, no Redis); `2` is `python main.py
--workers 2` with `REDIS_URL` on a redis-server started here (Debian's `redis-server`). Every
user is a browser as in bench/load.py: its page, send and stream go over its own connection, so
the kernel spreads users over the workers, and with the run log in Redis a stream is served by
whichever worker it reaches.

Reported per mode and load: replies/s, TTFT p50/p95, and server CPU per reply: the CPU seconds of
every process of the app (the supervisor and each worker, from /proc) plus redis-server's,
divided by the replies completed. The fake model and the load client run on this machine too,
at nice -5, so wall-clock scaling is capped on 2 cores; CPU per reply is the figure to compare.
Figures go to stdout and bench/results/workers.json. Loopback only; every process started here
is stopped here; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from load import Reply, run_load  # noqa: E402
from run import (  # noqa: E402
    RESULTS,
    FakeModel,
    Proc,
    _children,
    _git,
    _renice,
    cpu_seconds,
    free_port,
)

LOADS = {
    "throughput": {"users": 100, "tokens": 300, "timeout": 300},
    "burst": {"users": 100, "tokens": 30, "timeout": 180},
}
START_TIMEOUT = 180.0


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo += _children(p)
    return out


def cpu_of(pids: list[int]) -> float:
    """CPU seconds used so far by the processes still alive among `pids`."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def start_app(workers: int, fake: FakeModel, tmp: Path, redis_url: str) -> Proc:
    """`python main.py --workers N` on a fresh database; returns once every worker has started."""
    port = free_port()
    db = tmp / f"app-w{workers}-{port}" / "chat.db"
    env = {
        "MODEL": "openai-chat:fake",
        "OPENAI_BASE_URL": f"{fake.url}/v1",
        "OPENAI_API_KEY": "x",
        "PORT": str(port),
        "DB_PATH": str(db),
        "AUTH": "none",
        # Every simulated user comes from 127.0.0.1, as in bench/run.py.
        "ADDRESS_MESSAGES_PER_MINUTE": "1000000",
        "MAX_RUNNING_REPLIES": "1000000",
        "WORKERS": str(workers),
        "REDIS_URL": redis_url if workers > 1 else "",
    }
    cmd = [sys.executable, "main.py"]
    proc = Proc.start(f"app-w{workers}", cmd, port=port, env=env, marker="main.py")
    proc.db = db
    proc.wait_ready(timeout=START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.log.read_text(errors="replace").count("Application startup complete") < workers:
        if time.monotonic() > deadline or proc.popen.poll() is not None:
            raise RuntimeError(f"{workers} workers did not all start; see {proc.log}")
        time.sleep(0.2)
    return proc


def one(mode: int, load: str, fake: FakeModel, tmp: Path, redis) -> dict:
    """Start the app in `mode`, warm it up, run `load`, measure CPU over app and Redis."""
    cfg = LOADS[load]
    proc = start_app(mode, fake, tmp, redis.url if redis else "")
    base = f"http://127.0.0.1:{proc.port}"
    try:
        fake.configure(cfg["tokens"], 0)
        warm = asyncio.run(run_load("app", base, 2 * mode, Reply.for_model(cfg["tokens"], 0)))
        if warm["completed"] != 2 * mode:
            raise RuntimeError(f"warm-up failed: {warm['errors']}")
        fake.stats(reset=True)
        pids = tree(proc.pid) + ([redis.pid] if redis and mode > 1 else [])
        cpu0, t0 = cpu_of(pids), time.perf_counter()
        reply = Reply.for_model(cfg["tokens"], 0)
        summary = asyncio.run(
            run_load("app", base, cfg["users"], reply, timeout=cfg["timeout"], model_url=fake.url)
        )
        cpu = cpu_of(pids) - cpu0
        wall = time.perf_counter() - t0
        model = fake.stats()
    finally:
        proc.stop(signal.SIGTERM, timeout=60)
    done = summary["completed"]
    return {
        "mode": f"{mode} worker" + ("s + redis" if mode > 1 else ""),
        "load": load,
        "users": cfg["users"],
        "tokens": cfg["tokens"],
        "completed": done,
        "errors": summary["errors"],
        "replies_per_s": summary["replies_per_s"],
        "ttft_ms_p50": summary["ttft_ms_p50"],
        "ttft_ms_p95": summary["ttft_ms_p95"],
        "server_cpu_s": round(cpu, 2),
        "cpu_ms_per_reply": round(1000 * cpu / done, 1) if done else None,
        "replies_per_cpu_s": round(done / cpu, 1) if cpu else None,
        "wall_s": round(wall, 2),
        # One model call per message, whichever worker took it.
        "model_requests": model["requests"] - model["title_requests"],
    }


def print_table(rows: list[dict]) -> None:
    """The figures, one line per mode and load."""
    cols = [
        ("mode", 20), ("load", 11), ("completed", 9), ("replies_per_s", 13),
        ("ttft_ms_p50", 11), ("ttft_ms_p95", 11), ("cpu_ms_per_reply", 16),
        ("replies_per_cpu_s", 17), ("model_requests", 14),
    ]  # fmt: skip
    print("  ".join(name.ljust(width) for name, width in cols))
    for row in rows:
        print("  ".join(str(row.get(name)).ljust(width) for name, width in cols))
        if row["errors"]:
            print("    errors:", row["errors"])


def main(argv: list[str] | None = None) -> None:
    """Run the chosen modes and loads, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--loads", default="throughput,burst", help=f"of {', '.join(LOADS)}")
    args = parser.parse_args(argv)
    modes = [int(m) for m in args.modes.split(",")]
    loads = args.loads.split(",")
    _renice(-5)  # the load client: its clock reads are the measurements (as bench/run.py)
    redis = None
    fake = FakeModel()
    rows: list[dict] = []
    try:
        if any(m > 1 for m in modes):
            from tests.redis_server import start_redis

            redis = start_redis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            for load in loads:
                for mode in modes:
                    print(f"== {mode} worker(s), {load}", flush=True)
                    rows.append(one(mode, load, fake, Path(tmp), redis))
    finally:
        if redis:
            redis.stop()
        fake.proc.stop()
    print()
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "workers.json"
    out.write_text(json.dumps({"commit": _git("rev-parse", "--short", "HEAD"), "runs": rows}))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
