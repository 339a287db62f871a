"""One worker against two (with Redis), on the same loads: is a second worker worth its cost?

    uv run python bench/workers.py                      # 3 modes x 2 loads x 2 rounds (~10 min)
    uv run python bench/workers.py --modes 1 --rounds 1 # one worker only (no Redis needed)
    uv run python bench/workers.py --modes 1r,2 --loads burst
    uv run python bench/workers.py --modes 1,2,1@/tmp/old,2@/tmp/old  # A/B against a checkout

Loads (the same for every mode):
- `throughput`: 100 users at once x 300 tokens at full speed (bench/run.py's throughput).
- `burst`: 100 users at once each sending a first message with a short reply (30 tokens): what
  matters is how soon the first token shows (TTFT), with every worker taking its share.

Modes: `1` is `python main.py` as shipped (one process, no Redis: the run log in memory); `1r`
is the same one process with `REDIS_URL` (the run log, limits and leases in Redis: what the
shared log costs); `2` is `python main.py --workers 2` with `REDIS_URL`. Redis is a
redis-server started here (Debian's `redis-server`). Every user is a browser as in
bench/load.py, with its own connection; its reply stream opens a fresh connection
(`fresh_stream`), so under two workers the kernel hands it to either worker and about half the
streams are served by another worker than the one that runs the reply (through the log).

Modes are alternated within each load and the whole set repeated (`--rounds`), so a neighbour's
load on the machine hits every mode alike. Reported per mode and load: replies/s, TTFT p50/p95,
and server CPU per reply: the CPU seconds of every process of the app (the supervisor and each
worker, from /proc) plus redis-server's (in Redis modes), divided by the replies completed. The
fake model and the load client run on this machine too, at nice -5, so wall-clock scaling is
capped on 2 cores; CPU per reply is the figure to compare. Figures go to stdout and
bench/results/workers.json. Loopback only; every process started here is stopped here; every
wait is bounded.
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
    _settle,
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


MODES = {"1": (1, False), "1r": (1, True), "2": (2, True)}  # mode: (workers, uses Redis)
NAMES = {"1": "1 worker", "1r": "1 worker + redis", "2": "2 workers + redis"}


def parse_mode(mode: str) -> tuple[str, Path]:
    """A mode and the checkout it runs: `2` here, `2@PATH` another checkout (A/B runs, with
    that checkout's .venv)."""
    name, _, root = mode.partition("@")
    if name not in MODES:
        raise SystemExit(f"unknown mode {name!r}: one of {', '.join(MODES)}")
    return name, Path(root).resolve() if root else ROOT


def mode_name(mode: str) -> str:
    """How a mode is shown: its name, and the other checkout's directory if it has one."""
    name, root = parse_mode(mode)
    return NAMES[name] if root == ROOT else f"{NAMES[name]} ({root.name})"


def start_app(workers: int, fake: FakeModel, tmp: Path, redis_url: str, root: Path = ROOT) -> Proc:
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
        "REDIS_URL": redis_url,
    }
    python = sys.executable if root == ROOT else str(root / ".venv" / "bin" / "python")
    cmd = [python, "main.py"]
    name = f"app-w{workers}-{port}"  # a log per run (bench/results/<name>.log)
    proc = Proc.start(name, cmd, port=port, env=env, marker="main.py", cwd=root)
    proc.db = db
    proc.wait_ready(timeout=START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.log.read_text(errors="replace").count("Application startup complete") < workers:
        if time.monotonic() > deadline or proc.popen.poll() is not None:
            raise RuntimeError(f"{workers} workers did not all start; see {proc.log}")
        time.sleep(0.2)
    return proc


def one(mode: str, load: str, fake: FakeModel, tmp: Path, redis) -> dict:
    """Start the app in `mode`, warm it up, run `load`, measure CPU over app and Redis."""
    cfg = LOADS[load]
    name, root = parse_mode(mode)
    workers, shared = MODES[name]
    proc = start_app(workers, fake, tmp, redis.url if shared else "", root)
    base = f"http://127.0.0.1:{proc.port}"
    try:
        fake.configure(cfg["tokens"], 0)
        warm = asyncio.run(
            run_load("app", base, 4, Reply.for_model(cfg["tokens"], 0), fresh_stream=True)
        )
        if warm["completed"] != 4:
            raise RuntimeError(f"warm-up failed: {warm['errors']}")
        fake.stats(reset=True)
        pids = tree(proc.pid) + ([redis.pid] if shared else [])
        redis_pids = [redis.pid] if shared else []
        cpu0, t0 = cpu_of(pids), time.perf_counter()
        redis0 = cpu_of(redis_pids)
        reply = Reply.for_model(cfg["tokens"], 0)
        summary = asyncio.run(
            run_load(
                "app",
                base,
                cfg["users"],
                reply,
                timeout=cfg["timeout"],
                model_url=fake.url,
                fresh_stream=True,
            )
        )
        cpu = cpu_of(pids) - cpu0
        redis_cpu = cpu_of(redis_pids) - redis0
        wall = time.perf_counter() - t0
        model = fake.stats()
        # With every title made (they wait while the server is busy): the same work per
        # reply in every mode, whatever the timing (see bench/run.py `_settle`).
        titles = _settle(fake)
        settled = cpu_of(pids) - cpu0
    finally:
        proc.stop(signal.SIGTERM, timeout=60)
    done = summary["completed"]
    return {
        "mode": mode_name(mode),
        "load": load,
        "users": cfg["users"],
        "tokens": cfg["tokens"],
        "completed": done,
        "errors": summary["errors"],
        "replies_per_s": summary["replies_per_s"],
        "ttft_ms_p50": summary["ttft_ms_p50"],
        "ttft_ms_p95": summary["ttft_ms_p95"],
        # Updates a reply's stream carried: each is a render and an event (and with Redis an
        # entry); a process's tick follows its own count of running replies.
        "events_per_reply": summary["events_per_reply"],
        "server_cpu_s": round(cpu, 2),
        "cpu_ms_per_reply": round(1000 * cpu / done, 1) if done else None,
        # The part of it that is redis-server's own (0 without Redis).
        "redis_cpu_ms_per_reply": round(1000 * redis_cpu / done, 1) if done else None,
        "replies_per_cpu_s": round(done / cpu, 1) if cpu else None,
        "cpu_ms_per_reply_settled": round(1000 * settled / done, 1) if done else None,
        "titles_settled": titles,
        "wall_s": round(wall, 2),
        # One model call per message, whichever worker took it.
        "model_requests": model["requests"] - model["title_requests"],
    }


def print_table(rows: list[dict]) -> None:
    """The figures, one line per mode and load."""
    cols = [
        ("mode", 20), ("load", 11), ("completed", 9), ("replies_per_s", 13),
        ("ttft_ms_p50", 11), ("ttft_ms_p95", 11), ("cpu_ms_per_reply", 16),
        ("redis_cpu_ms_per_reply", 22), ("replies_per_cpu_s", 17), ("model_requests", 14),
        ("cpu_ms_per_reply_settled", 24), ("events_per_reply", 16),
    ]  # fmt: skip
    print("  ".join(name.ljust(width) for name, width in cols))
    for row in rows:
        print("  ".join(str(row.get(name)).ljust(width) for name, width in cols))
        if row["errors"]:
            print("    errors:", row["errors"])


def means(rows: list[dict]) -> list[dict]:
    """One row per mode and load: the mean of its rounds (completed and errors summed)."""
    keys = ["replies_per_s", "ttft_ms_p50", "ttft_ms_p95", "cpu_ms_per_reply"]
    keys += ["redis_cpu_ms_per_reply", "replies_per_cpu_s", "model_requests"]
    keys += ["cpu_ms_per_reply_settled", "events_per_reply"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["load"]), []).append(row)
    out = []
    for (mode, load), group in groups.items():
        mean = {"mode": mode, "load": load, "completed": sum(r["completed"] for r in group)}
        mean["errors"] = {}
        for r in group:
            for err, n in r["errors"].items():
                mean["errors"][err] = mean["errors"].get(err, 0) + n
        for key in keys:
            vals = [r[key] for r in group if r[key] is not None]
            mean[key] = round(sum(vals) / len(vals), 1) if vals else None
        out.append(mean)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the chosen modes and loads, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="1,1r,2", help=f"of {', '.join(MODES)}")
    parser.add_argument("--loads", default="throughput,burst", help=f"of {', '.join(LOADS)}")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of the whole set")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    loads = args.loads.split(",")
    _renice(-5)  # the load client: its clock reads are the measurements (as bench/run.py)
    redis = None
    fake = FakeModel()
    rows: list[dict] = []
    try:
        if any(MODES[parse_mode(m)[0]][1] for m in modes):
            from tests.redis_server import start_redis

            redis = start_redis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            for rnd in range(1, args.rounds + 1):
                for load in loads:
                    for mode in modes:
                        print(f"== round {rnd}: {mode_name(mode)}, {load}", flush=True)
                        row = one(mode, load, fake, Path(tmp), redis)
                        rows.append({**row, "round": rnd})
    finally:
        if redis:
            redis.stop()
        fake.proc.stop()
    print()
    print_table(rows)
    if args.rounds > 1:
        print("\nmean of the rounds:")
        print_table(means(rows))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "workers.json"
    out.write_text(
        json.dumps(
            {"commit": _git("rev-parse", "--short", "HEAD"), "runs": rows, "means": means(rows)}
        )
    )
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
