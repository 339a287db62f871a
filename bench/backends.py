"""SQLite against Postgres, each under 2 app processes and one Redis: what the Postgres store costs.

    uv run python bench/backends.py                          # both backends, 2 rounds (~7 min)
    uv run python bench/backends.py --backends sqlite --rounds 1
    uv run python bench/backends.py --skip-load --rounds 3 --opens 40   # the long conversation
    uv run python bench/backends.py --users 100 --tokens 300 --turns 2000

Each backend runs as a deployment of it would: `python main.py` with `WORKERS=2` and
`REDIS_URL` (bench/workers.py's start-up), on SQLite (a fresh file) or on Postgres
(`DATABASE_URL`, a fresh schema on a PostgreSQL server started here with
tests/postgres_server.start_postgres, Debian's binaries). One redis-server and one fake model
serve every run. Backends are alternated within each round, so a neighbour's load on this
shared machine hits both alike. Two measurements per backend and round:

- `load`: `--users` users at once, each a browser sending one message and reading a
  `--tokens`-token reply at full speed, its stream on a fresh connection (so streams cross
  workers, as in bench/workers.py). Reported: replies/s, TTFT p50/p95, model requests (one per
  message) and server CPU per reply: every app process (supervisor and workers) plus
  redis-server plus, for Postgres, every process of the PostgreSQL server (the postmaster, its
  background processes and the app's connections' backends, from /proc; with the CPU of
  backends that exited, which the postmaster's reaped-children counters hold).
- `open`: a conversation of `--turns` turns (2 x turns messages) per backend: one created
  through the app (so a browser's identity owns it), the rest appended through the store
  (`chat.stores.open_store`, the same settings the app has). Three such conversations, so the
  first ("cold": its replies' HTML not cached yet) open is timed three times; then `--opens`
  warm opens and a few JSON exports (the whole branch streamed) of one of them. Medians, and
  the server CPU (app + Postgres, and Postgres's share) per warm open and per export.

The machine has 2 cores shared with the fake model, the load client and other work, so
absolute figures move between runs; the ratios (Postgres / SQLite) of one run are the figures
to read. Printed as a table and saved to bench/results/backends.json. Loopback only; every
process started here is stopped here; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from load import Reply, run_load  # noqa: E402
from run import CLK_TCK, RESULTS, FakeModel, Proc, _git, _renice, first_turn, seed_turns  # noqa: E402
from workers import cpu_of, start_app, tree  # noqa: E402

BACKENDS = ("sqlite", "postgres")
WORKERS = 2
SECRET = "bench-backends"  # required with DATABASE_URL; the same for every process


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """`values` in os.environ for the duration: bench/workers.start_app builds its own env on
    top of os.environ, so this is how a run adds DATABASE_URL and SECRET_KEY to it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# PostgreSQL ---------------------------------------------------------------------------------


class Postgres:
    """One PostgreSQL server for the whole bench (tests/postgres_server.start_postgres)."""

    def __init__(self, directory: Path):
        from tests.postgres_server import start_postgres

        self.url, self._stop = start_postgres(directory)
        self.pid = postmaster(self.url)

    def fresh_url(self) -> str:
        """An empty schema on this server, for one run."""
        from tests.postgres_server import fresh_database_url

        return fresh_database_url(self.url)

    def cpu(self) -> float:
        """CPU seconds of every server process alive now, plus those its exited children used."""
        return cpu_of(tree(self.pid)) + reaped_cpu(self.pid)

    def stop(self) -> None:
        """Stop the server."""
        self._stop()


def postmaster(url: str) -> int:
    """The pid of the server's first process: a backend's parent. Every other server process
    (background workers, one backend per connection) is its child."""
    import psycopg

    with psycopg.connect(url) as conn:  # read while connected: the backend ends with it
        backend = conn.execute("select pg_backend_pid()").fetchone()[0]
        with open(f"/proc/{backend}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, ppid


def reaped_cpu(pid: int) -> float:
    """CPU seconds of `pid`'s children that have exited and been waited for (cutime + cstime)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


# One app ------------------------------------------------------------------------------------


def start(backend: str, fake: FakeModel, tmp: Path, redis_url: str, pg: Postgres | None) -> Proc:
    """`python main.py` with 2 workers and Redis, on a fresh SQLite file or Postgres schema."""
    # An empty DATABASE_URL is the SQLite store, whatever the caller's environment says.
    database_url = pg.fresh_url() if backend == "postgres" else ""
    with environ(DATABASE_URL=database_url, SECRET_KEY=SECRET):
        proc = start_app(WORKERS, fake, tmp, redis_url)
    proc.database_url = database_url
    return proc


def server_cpu(proc: Proc, redis_pid: int, pg: Postgres | None) -> dict[str, float]:
    """CPU seconds so far: the app's processes, redis-server's, and Postgres's (if used)."""
    return {
        "app": cpu_of(tree(proc.pid)),
        "redis": cpu_of([redis_pid]),
        "postgres": pg.cpu() if pg else 0.0,
    }


def load_run(backend: str, args, fake: FakeModel, tmp: Path, redis, pg: Postgres | None) -> dict:
    """Start the app on `backend`, warm it up, run the load, measure CPU over every server."""
    proc = start(backend, fake, tmp, redis.url, pg)
    base = f"http://127.0.0.1:{proc.port}"
    used_pg = pg if backend == "postgres" else None
    try:
        fake.configure(args.tokens, 0)
        reply = Reply.for_model(args.tokens, 0)
        warm = asyncio.run(run_load("app", base, 4, reply, fresh_stream=True))
        if warm["completed"] != 4:
            raise RuntimeError(f"warm-up failed: {warm['errors']}")
        fake.stats(reset=True)
        before = server_cpu(proc, redis.pid, used_pg)
        summary = asyncio.run(
            run_load(
                "app",
                base,
                args.users,
                reply,
                timeout=args.timeout,
                model_url=fake.url,
                fresh_stream=True,
            )
        )
        after = server_cpu(proc, redis.pid, used_pg)
        model = fake.stats()
    finally:
        proc.stop(signal.SIGTERM, timeout=60)
    done = summary["completed"]
    cpu = {k: after[k] - before[k] for k in after}
    total = sum(cpu.values())

    def per_reply(seconds: float) -> float | None:
        return round(1000 * seconds / done, 1) if done else None

    return {
        "backend": backend,
        "users": args.users,
        "tokens": args.tokens,
        "completed": done,
        "errors": summary["errors"],
        "replies_per_s": summary["replies_per_s"],
        "ttft_ms_p50": summary["ttft_ms_p50"],
        "ttft_ms_p95": summary["ttft_ms_p95"],
        "cpu_ms_per_reply": per_reply(total),
        "app_cpu_ms_per_reply": per_reply(cpu["app"]),
        "redis_cpu_ms_per_reply": per_reply(cpu["redis"]),
        "postgres_cpu_ms_per_reply": per_reply(cpu["postgres"]) if used_pg else None,
        "replies_per_cpu_s": round(done / total, 1) if total else None,
        # One model call per message, whichever worker took it.
        "model_requests": model["requests"] - model["title_requests"],
    }


# A long conversation ------------------------------------------------------------------------


def seed(proc: Proc, cid: str, turns: int, text: str) -> None:
    """Append `turns - 1` finished turns to `cid` through the store the app uses."""
    from chat.config import Settings
    from chat.stores import open_store

    env = {"DATABASE_URL": proc.database_url, "DB_PATH": str(proc.db), "SECRET_KEY": SECRET}
    store = open_store(Settings.from_env(env))
    try:
        seed_turns(store, cid, turns - 1, text)
        conv = next(c for c in store.all_conversations() if c["id"] == cid)
        assert len(store.branch(conv["head_turn_id"])) == turns
    finally:
        store.close()


def timed(client: httpx.Client, url: str) -> tuple[float, int]:
    """Seconds to GET `url` to its last byte, and the body's size."""
    t = time.perf_counter()
    r = client.get(url)
    r.raise_for_status()
    return time.perf_counter() - t, len(r.content)


def open_run(backend: str, args, fake: FakeModel, tmp: Path, redis, pg: Postgres | None) -> dict:
    """Seed three long conversations on `backend`; time cold and warm opens and exports."""
    fake.configure(300, 0)
    proc = start(backend, fake, tmp, redis.url, pg)
    base = f"http://127.0.0.1:{proc.port}"
    text = "".join(Reply.for_model(300, 0).tokens)
    try:
        with httpx.Client(base_url=base, timeout=120, trust_env=False) as client:
            cids, seed_s = [], []
            for _ in range(3):
                cids.append(first_turn(client))
                t = time.perf_counter()
                seed(proc, cids[-1], args.turns, text)
                seed_s.append(time.perf_counter() - t)
            # The first open of each renders its shown replies and caches their HTML.
            cold = [timed(client, f"/c/{cid}")[0] for cid in cids]
            used_pg = pg if backend == "postgres" else None
            cpu0 = server_cpu(proc, redis.pid, used_pg)
            warm, size = [], 0
            for _ in range(args.opens):
                seconds, size = timed(client, f"/c/{cids[0]}")
                warm.append(seconds)
            cpu1 = server_cpu(proc, redis.pid, used_pg)
            exports, export_bytes = [], 0
            for _ in range(args.exports):
                seconds, export_bytes = timed(client, f"/c/{cids[0]}/export.json")
                exports.append(seconds)
            cpu2 = server_cpu(proc, redis.pid, used_pg)
    finally:
        proc.stop(signal.SIGTERM, timeout=60)

    def ms(xs: list[float]) -> float:
        return round(1000 * statistics.median(xs), 1)

    return {
        "backend": backend,
        "messages": 2 * args.turns,
        "seed_s": round(statistics.median(seed_s), 1),
        "open_cold_ms": ms(cold),
        "open_warm_ms": ms(warm),
        # Server CPU (app + Postgres) per warm open and per export: what the wall times cost,
        # without the waits for a core that a busy machine adds to every round trip.
        "open_cpu_ms": cpu_ms(cpu0, cpu1, args.opens),
        "open_pg_cpu_ms": round(1000 * (cpu1["postgres"] - cpu0["postgres"]) / args.opens, 1),
        "page_bytes": size,
        "export_json_ms": ms(exports),
        "export_cpu_ms": cpu_ms(cpu1, cpu2, args.exports),
        "export_pg_cpu_ms": round(1000 * (cpu2["postgres"] - cpu1["postgres"]) / args.exports, 1),
        "export_json_bytes": export_bytes,
    }


def cpu_ms(before: dict[str, float], after: dict[str, float], n: int) -> float:
    """Milliseconds of server CPU (every process) per request between two `server_cpu` reads."""
    return round(1000 * sum(after[k] - before[k] for k in after) / n, 1)


# Report -------------------------------------------------------------------------------------

LOAD_COLS = [
    "replies_per_s", "ttft_ms_p50", "ttft_ms_p95", "cpu_ms_per_reply", "app_cpu_ms_per_reply",
    "redis_cpu_ms_per_reply", "postgres_cpu_ms_per_reply", "replies_per_cpu_s",
]  # fmt: skip
OPEN_COLS = [
    "seed_s", "open_cold_ms", "open_warm_ms", "open_cpu_ms", "open_pg_cpu_ms", "export_json_ms",
    "export_cpu_ms", "export_pg_cpu_ms",
    "page_bytes",
]  # fmt: skip


def means(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """Per backend, the mean over rounds of each of `keys` (None where no round had it)."""
    out: dict[str, dict] = {}
    for backend in BACKENDS:
        group = [r for r in rows if r["backend"] == backend]
        if not group:
            continue
        mean: dict = {"backend": backend, "rounds": len(group)}
        for key in keys:
            vals = [r[key] for r in group if r.get(key) is not None]
            mean[key] = round(sum(vals) / len(vals), 1) if vals else None
            if key.endswith("_bytes") and mean[key] is not None:
                mean[key] = round(mean[key])
        for key in ("completed", "model_requests"):
            if key in group[0]:
                mean[key] = sum(r[key] for r in group)
        out[backend] = mean
    return out


def ratios(by_backend: dict[str, dict], keys: list[str]) -> dict[str, float | None]:
    """Postgres / SQLite for each of `keys`."""
    if set(BACKENDS) - set(by_backend):
        return {}
    pg, lite = by_backend["postgres"], by_backend["sqlite"]
    return {
        k: round(pg[k] / lite[k], 2) if pg.get(k) is not None and lite.get(k) else None
        for k in keys
    }


def table(title: str, by_backend: dict[str, dict], keys: list[str]) -> str:
    """One line per backend, and the ratio line."""
    width = {k: max(len(k), 8) for k in keys}
    lines = [title, "backend   " + "  ".join(k.ljust(width[k]) for k in keys)]
    for backend, row in by_backend.items():
        lines.append(backend.ljust(10) + "  ".join(str(row[k]).ljust(width[k]) for k in keys))
    if r := ratios(by_backend, keys):
        lines.append("pg/sqlite " + "  ".join(str(r[k]).ljust(width[k]) for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the load and the long conversation on each backend, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="sqlite, postgres")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of the whole set")
    parser.add_argument("--users", type=int, default=60, help="users at once in the load")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply in the load")
    parser.add_argument("--timeout", type=float, default=180, help="per user, seconds")
    parser.add_argument("--turns", type=int, default=1000, help="turns of a long conversation")
    parser.add_argument("--opens", type=int, default=15, help="warm opens timed")
    parser.add_argument("--exports", type=int, default=3, help="JSON exports timed")
    parser.add_argument("--skip-open", action="store_true", help="the load only")
    parser.add_argument("--skip-load", action="store_true", help="the long conversation only")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    _renice(-5)  # the load client: its clock reads are the measurements (as bench/run.py)
    from tests.redis_server import start_redis

    fake = FakeModel()
    redis = pg = None
    loads: list[dict] = []
    opens: list[dict] = []
    try:
        redis = start_redis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        if "postgres" in backends:
            pg = Postgres(Path(tempfile.mkdtemp(prefix="bench-postgres-")))
        with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
            for rnd in range(1, args.rounds + 1):
                # Alternated, and the other way round in the next round.
                order = backends if rnd % 2 else backends[::-1]
                for backend in [] if args.skip_load else order:
                    print(f"== round {rnd}: {backend}, load", flush=True)
                    loads.append(
                        {**load_run(backend, args, fake, Path(tmp), redis, pg), "round": rnd}
                    )
                if not args.skip_open:
                    for backend in order:
                        print(f"== round {rnd}: {backend}, {2 * args.turns} messages", flush=True)
                        opens.append(
                            {**open_run(backend, args, fake, Path(tmp), redis, pg), "round": rnd}
                        )
    finally:
        if pg:
            pg.stop()
        if redis:
            redis.stop()
        fake.proc.stop()
    load_means, open_means = means(loads, LOAD_COLS), means(opens, OPEN_COLS)
    print()
    print(
        table(
            f"load: {args.users} users x {args.tokens} tokens, 2 workers + Redis",
            load_means,
            LOAD_COLS,
        )
    )
    for row in loads:
        if row["errors"]:
            print(f"  {row['backend']} round {row['round']} errors: {row['errors']}")
    print(
        "model requests (one per message):", {b: m["model_requests"] for b, m in load_means.items()}
    )
    if opens:
        print()
        print(table(f"a {2 * args.turns}-message conversation", open_means, OPEN_COLS))
    report = {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "args": vars(args),
        "load": loads,
        "open": opens,
        "load_means": load_means,
        "open_means": open_means,
        "load_ratios": ratios(load_means, LOAD_COLS),
        "open_ratios": ratios(open_means, OPEN_COLS),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "backends.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
