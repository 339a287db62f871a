"""Benchmark runner: the app against seed 001's Pattern 4 baseline, same machine, same fake model.

    uv run python bench/run.py --scenario all            # everything (about 10 minutes on 2 cores)
    uv run python bench/run.py --scenario throughput --rounds 3
    uv run python bench/run.py --scenario throughput --profile   # app under pyinstrument

Each run starts a fresh server process (the app with a fresh SQLite file, or the baseline under
`uv run --with fastapi`), warms it up with two replies at full speed, sets the fake model's pace,
drives the load and reads the server's CPU time and memory from /proc. App and baseline runs
alternate (ABBA...), so drift on the machine hits both. Everything listens on 127.0.0.1, every
wait is bounded, and every process started here is stopped here. Figures are printed as a table
and saved as JSON under bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import load  # noqa: E402
from load import Gauge, Reply, percentile, run_load  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = {
    # name: users, tokens, rate (tokens/s per stream, 0 = no delay), per-user timeout, and
    # `ramp`: seconds over which users start (default 0: all at once)
    "throughput": {"users": 100, "tokens": 300, "rate": 0, "timeout": 300},
    "paced": {"users": 100, "tokens": 300, "rate": 50, "timeout": 300},
    # The same pace with few users, where neither server is saturated on 2 cores (at 50
    # tokens/s the app spends ~2.4 ms of CPU per token, so 20 users already saturate it).
    "paced-light": {"users": 5, "tokens": 300, "rate": 50, "timeout": 120},
    # Held, not busy: users arrive over 30 s and each reply takes 96 s (a token every 4 s), so
    # all 1,000 streams are open together for about a minute while the servers' CPU stays
    # mostly below saturation; what is measured is the memory they hold.
    "streams": {"users": 1000, "tokens": 24, "rate": 0.25, "timeout": 240, "ramp": 30},
}
TARGETS = ("app", "baseline")
TRACEMALLOC = False  # --tracemalloc: the app under bench/trace_app.py, dumped at peak streams


# Processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak resident set) in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _renice(delta: int) -> None:
    """Raise the measuring processes' priority over the server's, where permitted."""
    try:
        os.nice(delta)
    except OSError:
        pass


@dataclass
class Proc:
    """A server started here: the launcher (often `uv run`) and the Python process it runs."""

    name: str
    popen: subprocess.Popen
    pid: int  # the Python process doing the work (the launcher's descendant)
    port: int
    log: Path
    db: Path | None = None  # the app's SQLite file

    @classmethod
    def start(
        cls,
        name: str,
        cmd: list[str],
        *,
        port: int,
        env: dict,
        marker: str,
        nice: int = 0,
        cwd: Path = ROOT,
    ) -> Proc:
        """Start `cmd`, then find the descendant Python process whose command line has `marker`."""
        RESULTS.mkdir(exist_ok=True)
        log = RESULTS / f"{name}.log"
        with open(log, "w") as out:
            popen = subprocess.Popen(
                cmd,
                preexec_fn=(lambda: _renice(nice)) if nice else None,
                cwd=cwd,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited early; see {log}")
            todo, found = [popen.pid], None
            while todo:
                pid = todo.pop()
                if marker in _cmdline(pid) and "python" in _cmdline(pid).split(" ")[0]:
                    found = pid
                todo += _children(pid)
            if found:
                return cls(name, popen, found, port, log)
            time.sleep(0.05)
        popen.kill()
        raise RuntimeError(f"could not find the {name} Python process")

    def wait_ready(self, path: str = "/health", timeout: float = 120) -> None:
        """Poll until the server answers `path` with 200 (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Ask the server to stop; kill its process group (started here) if it will not."""
        try:  # only the server itself: `uv run` exits with it (and would forward a second signal)
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            try:  # a zombie of the launcher's child is gone once the launcher reaped it
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)


class FakeModel:
    """The fake model server, one process for the whole benchmark, reconfigured per run."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = Proc.start(
            "fake_model",
            [sys.executable, str(BENCH / "fake_model.py"), "--port", str(self.port)],
            port=self.port,
            env={},
            marker="fake_model.py",
            nice=-5,  # its send times are the reference for the added gap; keep them on time
        )
        self.proc.wait_ready("/stats")
        self.url = f"http://127.0.0.1:{self.port}"

    def configure(self, tokens: int, rate: float) -> None:
        """Set reply length and pace."""
        httpx.post(f"{self.url}/config", params={"tokens": tokens, "rate": rate}).raise_for_status()

    def stats(self, reset: bool = False) -> dict:
        """Requests served and how late paced sends were."""
        return httpx.get(f"{self.url}/stats", params={"reset": 1} if reset else None).json()


def app_root(target: str) -> Path | None:
    """The checkout an app target runs from: `app` is this one, `app@PATH` another (A/B runs)."""
    if target == "app":
        return ROOT
    if target.startswith("app@"):
        return Path(target[4:]).resolve()
    return None


def start_server(target: str, fake: FakeModel, tmp: Path, *, profile: Path | None = None) -> Proc:
    """Start the app (`uv run python main.py`) or the baseline (`uv run --with fastapi ...`)."""
    port = free_port()
    env = {
        "MODEL": "openai-chat:fake",
        "OPENAI_BASE_URL": f"{fake.url}/v1",
        "OPENAI_API_KEY": "x",
        "PORT": str(port),
        "AUTH": "none",  # anonymous identities, whatever a local .env says
        # Every simulated user comes from 127.0.0.1: the per-address limit and the cap on
        # replies at once would refuse most of a 1,000-user run, which measures the server.
        "ADDRESS_MESSAGES_PER_MINUTE": "1000000",
        "MAX_RUNNING_REPLIES": "1000000",
    }
    root = app_root(target)
    if root is not None:
        db = tmp / f"app-{port}" / "chat.db"
        env["DB_PATH"] = str(db)
        marker = "main.py"
        if profile and profile.suffix == ".prof":  # --cprofile: exact call counts
            cmd = ["uv", "run", "python", "-m", "cProfile", "-o", str(profile), "main.py"]
        elif profile:
            cmd = ["uv", "run", "--with", "pyinstrument", "pyinstrument", "-r", "pyisession"]
            cmd += ["-o", str(profile), "main.py"]
        elif TRACEMALLOC:
            cmd, marker = ["uv", "run", "python", "bench/trace_app.py"], "trace_app.py"
        else:
            cmd = ["uv", "run", "python", "main.py"]
        proc = Proc.start("app", cmd, port=port, env=env, marker=marker, cwd=root)
        proc.db = db
    else:
        if target == "baseline-nodebounce":
            env["BASELINE_DEBOUNCE"] = "none"
        cmd = ["uv", "run", "--with", "fastapi", "python", "bench/baseline_server.py"]
        proc = Proc.start(
            target, cmd + ["--port", str(port)], port=port, env=env, marker="baseline_server.py"
        )
    proc.wait_ready()
    return proc


# One run ---------------------------------------------------------------------------------------


async def _sample(proc: Proc, gauge: Gauge, out: dict, stop: asyncio.Event) -> None:
    """Every 100 ms: server RSS, and RSS while the most streams were open."""
    while not stop.is_set():
        try:
            rss = memory_mb(proc.pid)["VmRSS"]
        except OSError:
            return
        out["rss_max_mb"] = max(out.get("rss_max_mb", 0), rss)
        if gauge.open > out.get("open_at_sample", -1):
            out["open_at_sample"] = gauge.open
            out["rss_at_peak_open_mb"] = rss
            if TRACEMALLOC and gauge.open == gauge.started == gauge.total:
                os.kill(proc.pid, signal.SIGUSR1)  # every stream is open: where is the memory?
        elif gauge.open == out["open_at_sample"]:
            out["rss_at_peak_open_mb"] = max(out["rss_at_peak_open_mb"], rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass


def _settle(fake: FakeModel, quiet: float = 2.0, limit: float = 30.0) -> int:
    """Wait (bounded) until the fake model has had no request for `quiet` seconds: the titles
    put off while the server was busy are made; return how many titles were asked for."""
    deadline = time.monotonic() + limit
    last, since = fake.stats()["requests"], time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.25)
        stats = fake.stats()
        if stats["requests"] != last:
            last, since = stats["requests"], time.monotonic()
    return fake.stats()["title_requests"]


def one_run(target: str, scenario: str, fake: FakeModel, tmp: Path, **kw) -> dict:
    """Start a server, warm it up, load it, measure it, stop it."""
    cfg = {**SCENARIOS[scenario], **{k: v for k, v in kw.items() if v is not None}}
    commit = _git("rev-parse", "--short", "HEAD")
    proc = start_server(target, fake, tmp, profile=kw.get("profile"))
    base = f"http://127.0.0.1:{proc.port}"
    kind = "app" if app_root(target) is not None else "baseline"
    try:
        fake.configure(cfg["tokens"], 0)
        warm_reply = Reply.for_model(cfg["tokens"], 0)
        warm = asyncio.run(run_load(kind, base, 2, warm_reply, timeout=600 if TRACEMALLOC else 60))
        if warm["completed"] != 2:
            raise RuntimeError(f"warm-up failed: {warm['errors']}")
        fake.configure(cfg["tokens"], cfg["rate"])
        fake.stats(reset=True)
        reply = Reply.for_model(cfg["tokens"], cfg["rate"])
        idle = memory_mb(proc.pid)["VmRSS"]
        if TRACEMALLOC:
            os.kill(proc.pid, signal.SIGUSR2)  # trace from here on: what the load allocates
        cpu0, fcpu0 = cpu_seconds(proc.pid), cpu_seconds(fake.proc.pid)

        async def go() -> dict:
            gauge, samples, stop = Gauge(), {}, asyncio.Event()
            sampler = asyncio.create_task(_sample(proc, gauge, samples, stop))
            try:
                summary = await run_load(
                    kind,
                    base,
                    cfg["users"],
                    reply,
                    timeout=cfg["timeout"],
                    gauge=gauge,
                    ramp=cfg.get("ramp", 0),
                    model_url=fake.url,
                )
            finally:
                stop.set()
                await sampler
            return {**summary, **samples}

        summary = asyncio.run(go())
        summary["server_cpu_s"] = round(cpu_seconds(proc.pid) - cpu0, 2)
        summary["fake_model_cpu_s"] = round(cpu_seconds(fake.proc.pid) - fcpu0, 2)
        mem = memory_mb(proc.pid)
        summary["server_peak_mb"] = round(mem["VmHWM"], 1)
        summary["server_idle_mb"] = round(idle, 1)
        summary["rss_max_mb"] = round(summary.get("rss_max_mb", mem["VmRSS"]), 1)
        summary["rss_at_peak_open_mb"] = round(summary.get("rss_at_peak_open_mb", 0), 1)
        fstats = fake.stats()
        summary["model_requests"] = fstats["requests"]
        summary["model_title_requests"] = fstats["title_requests"]
        summary["model_late_ms_p99"] = fstats["late_ms_p99"]
        if kind == "app" and not kw.get("profile") and not TRACEMALLOC:
            # Titles wait while the server is busy, so how many run before the load ends is
            # timing, not work: the settled figure counts every reply's title, the same work
            # per reply for any two runs (steadier for A/B comparisons).
            summary["model_title_requests_settled"] = _settle(fake)
            summary["server_cpu_settled_s"] = round(cpu_seconds(proc.pid) - cpu0, 2)
    finally:
        proc.stop(signal.SIGINT if kw.get("profile") else signal.SIGTERM)
    summary.update(target=target, scenario=scenario, tokens=cfg["tokens"], rate=cfg["rate"])
    summary["ramp"] = cfg.get("ramp", 0)
    summary["commit"] = commit  # the lead may commit while a long benchmark runs
    return summary


# open2000: a long conversation ---------------------------------------------------------------


def first_turn(client: httpx.Client) -> str:
    """A conversation created as a browser does (its identity owns it); returns its id."""
    client.get("/").raise_for_status()
    sent = client.post(
        "/send",
        data={"msg": "First question", "cid": ""},
        headers={"HX-Request": "true", "Origin": str(client.base_url).rstrip("/")},
    )
    sent.raise_for_status()
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    stream_url = re.search(r'sse-connect="([^"]+)"', sent.text).group(1)
    with client.stream("GET", stream_url) as resp:  # let the first reply finish
        for _ in resp.iter_raw():
            pass
    return cid


def seed_turns(store, cid: str, count: int, text: str) -> None:
    """Add `count` finished exchanges (a question, `text` as the reply) to conversation `cid`,
    straight through the store, as a long conversation's history."""
    from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

    for i in range(count):
        user = f"Question {i + 2}: how does this part work, and what should I check?"
        request = ModelRequest(parts=[UserPromptPart(content=user)])
        turn = store.add_turn(cid, user, [request], model="openai-chat:fake")
        store.finish_turn(
            turn["id"],
            status="complete",
            reply_text=text,
            messages=[request, ModelResponse(parts=[TextPart(content=text)])],
            usage={"input_tokens": 40 + i, "output_tokens": 300, "requests": 1},
        )


def open2000(fake: FakeModel, tmp: Path, *, turns: int = 1000, reps: int = 60) -> dict:
    """Seed a conversation of `turns` turns (2 messages each) and time GET /c/{id}."""

    from chat.config import Settings
    from chat.stores import open_store

    fake.configure(300, 0)
    proc = start_server("app", fake, tmp)
    base = f"http://127.0.0.1:{proc.port}"
    text = "".join(Reply.for_model(300, 0).tokens)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            cid = first_turn(client)
            store = open_store(Settings(db_path=proc.db))
            owner = store.db.execute(
                "select owner from conversations where id = ?", [cid]
            ).fetchone()[0]
            assert store.conversation(cid, owner) is not None
            t0 = time.perf_counter()
            seed_turns(store, cid, turns - 1, text)
            seed_s = time.perf_counter() - t0
            count = store.db.execute(
                "select count(*) from turns where conversation_id = ?", [cid]
            ).fetchone()[0]
            store.close()
            url = f"/c/{cid}"
            # The first open renders the shown replies and caches their HTML (seeded rows have
            # none, like rows written before the cache existed); reported on its own.
            t = time.perf_counter()
            client.get(url).raise_for_status()
            first_open = time.perf_counter() - t
            for _ in range(2):
                client.get(url).raise_for_status()
            times, size = [], 0
            cpu0 = cpu_seconds(proc.pid)
            deadline = time.monotonic() + 120
            for _ in range(reps):
                t = time.perf_counter()
                page = client.get(url)
                times.append(time.perf_counter() - t)
                page.raise_for_status()
                size = len(page.content)
                if time.monotonic() > deadline:
                    break
            cpu = (cpu_seconds(proc.pid) - cpu0) / len(times)
            shown = page.text.count('data-role="user"') + page.text.count('data-role="assistant"')
    finally:
        proc.stop()
    return {
        "target": "app",
        "scenario": "open2000",
        "messages": count * 2,
        "seed_s": round(seed_s, 1),
        "reps": len(times),
        "open_ms_p50": round(percentile(times, 50) * 1000, 1),
        "open_ms_p95": round(percentile(times, 95) * 1000, 1),
        "first_open_ms_uncached": round(first_open * 1000, 1),
        "server_cpu_ms_per_open": round(cpu * 1000, 1),
        "page_bytes": size,
        "messages_shown": shown,
    }


# Report ------------------------------------------------------------------------------------


def pooled(runs: list[dict]) -> dict:
    """Combine the rounds of one target: means of per-run figures, percentiles of pooled samples."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
            out[key] = round(sum(vals) / len(vals), 3) if vals else None
    for key in ("server_peak_mb", "rss_max_mb", "rss_at_peak_open_mb", "stall_ms_max"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = max(vals) if vals else None
    ttft = [x for r in runs for x in r["_samples"]["ttft"]]
    added = [x for r in runs for x in r["_samples"]["added"]]
    latency = [x for r in runs for x in r["_samples"]["latency"]]

    def ms(v):
        return None if v is None else round(v * 1000, 2)

    out.update(
        ttft_ms_p50=ms(percentile(ttft, 50)),
        ttft_ms_p95=ms(percentile(ttft, 95)),
        added_gap_ms_p50=ms(percentile(added, 50)),
        added_gap_ms_p99=ms(percentile(added, 99)),
        token_latency_ms_p50=ms(percentile(latency, 50)),
        token_latency_ms_p99=ms(percentile(latency, 99)),
        completed=sum(r["completed"] for r in runs),
        users=sum(r["users"] for r in runs),
        rounds=len(runs),
        users_per_run=runs[0]["users"],
    )
    return out


ROWS = [
    ("rounds", "runs"),
    ("completed", "replies completed / users"),
    ("wall_s", "wall time, s (mean)"),
    ("replies_per_s", "replies/s (mean)"),
    ("ttft_ms_p50", "TTFT p50, ms"),
    ("ttft_ms_p95", "TTFT p95, ms"),
    ("added_gap_ms_p50", "added gap p50, ms"),
    ("added_gap_ms_p99", "added gap p99, ms"),
    ("stall_ms_max", "longest added gap in any reply, ms"),
    ("token_latency_ms_p50", "token latency p50, ms"),
    ("token_latency_ms_p99", "token latency p99, ms"),
    ("gaps_vs_model_sends", "replies timed against model sends"),
    ("wire_per_text_byte", "stream wire B / reply text B"),
    ("body_per_text_byte", "stream body B / reply text B"),
    ("wire_bytes_per_reply", "stream wire bytes per reply"),
    ("post_bytes_per_reply", "POST response wire bytes"),
    ("events_per_reply", "SSE events per reply"),
    ("stream_open_ms_p50", "POST start -> stream open p50, ms"),
    ("stream_open_ms_p95", "POST start -> stream open p95, ms"),
    ("server_cpu_s", "server CPU s (mean)"),
    ("server_cpu_settled_s", "server CPU s with every title (mean)"),
    ("server_peak_mb", "server peak RSS (VmHWM), MB"),
    ("rss_max_mb", "server RSS max during load, MB"),
    ("rss_at_peak_open_mb", "server RSS at most open streams, MB"),
    ("peak_open_streams", "most streams open at once"),
    ("s_to_peak_open", "seconds until most were open"),
    ("server_idle_mb", "server RSS after warm-up, MB"),
    ("client_cpu_s", "load client CPU s"),
    ("fake_model_cpu_s", "fake model CPU s"),
    ("model_late_ms_p99", "fake model send lateness p99, ms"),
    ("model_requests", "model requests (all)"),
    ("model_title_requests", "  of which title requests"),
    ("model_title_requests_settled", "title requests once settled"),
]


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(scenario: str, by_target: dict[str, dict]) -> str:
    """A text table: one column per target."""
    cols = list(by_target)
    lines = [f"\n== {scenario} " + "=" * 60]
    first = by_target[cols[0]]
    lines.append(
        f"   {first.get('users_per_run')} users x {int(first.get('tokens') or 0)} tokens, rate "
        f"{first.get('rate') or 'no delay'} tok/s"
        + (f", users arriving over {first['ramp']:.0f} s" if first.get("ramp") else "")
    )
    lines.append(f"{'':38}" + "".join(f"{c:>20}" for c in cols))
    for key, label in ROWS:
        vals = [by_target[c].get(key) for c in cols]
        if all(v is None for v in vals):
            continue
        if key == "completed":
            vals = [f"{by_target[c]['completed']}/{by_target[c]['users']}" for c in cols]
        lines.append(f"{label:38}" + "".join(f"{fmt(v):>20}" for v in vals))
    for c in cols:
        if by_target[c].get("errors"):
            lines.append(f"   {c} errors: {by_target[c]['errors']}")
    return "\n".join(lines)


def verdicts(report: dict) -> list[str]:
    """The issue's targets, each PASS or FAIL with the figures behind it."""
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    tp = report.get("throughput")
    if tp and "app" in tp and "baseline" in tp:
        a, b = tp["app"], tp["baseline"]
        ratio = a["replies_per_s"] / b["replies_per_s"] if b["replies_per_s"] else 0
        line(
            ratio >= 1.5,
            f"throughput >= 1.5x baseline: {a['replies_per_s']:.2f} vs "
            f"{b['replies_per_s']:.2f} replies/s = {ratio:.2f}x",
        )
        line(
            a["ttft_ms_p95"] <= b["ttft_ms_p95"],
            f"TTFT p95 <= baseline: {a['ttft_ms_p95']:.0f} ms vs {b['ttft_ms_p95']:.0f} ms",
        )
        line(
            a["wire_per_text_byte"] <= 1.5,
            f"wire bytes per reply text byte <= 1.5: {a['wire_per_text_byte']:.2f} "
            f"(baseline {b['wire_per_text_byte']:.2f})",
        )
    for name, note in (("paced", ""), ("paced-light", " (unsaturated)")):
        pc = report.get(name)
        if pc and "app" in pc:
            a = pc["app"]
            line(
                a["added_gap_ms_p99"] is not None and a["added_gap_ms_p99"] < 10,
                f"50 tok/s, {a['users_per_run']} users{note}: added gap p99 < 10 ms: "
                f"{fmt(a['added_gap_ms_p99'])} ms "
                f"(baseline {fmt(pc.get('baseline', {}).get('added_gap_ms_p99'))} ms)",
            )
    st = report.get("streams")
    if st and "app" in st:
        a = st["app"]
        line(
            a["peak_open_streams"] >= 1000 and a["rss_max_mb"] < 300,
            f"1,000 open streams in < 300 MB: {a['peak_open_streams']} open at once, "
            f"RSS max during the run {a['rss_max_mb']:.0f} MB, VmHWM {a['server_peak_mb']:.0f} MB"
            f" (baseline {fmt(st.get('baseline', {}).get('rss_max_mb'))} MB)",
        )
    op = report.get("open2000")
    if op and "app" in op:
        a = op["app"]
        line(
            a["open_ms_p50"] < 150,
            f"2,000-message conversation opens < 150 ms: "
            f"p50 {a['open_ms_p50']} ms, p95 {a['open_ms_p95']} ms, "
            f"server CPU {a['server_cpu_ms_per_open']} ms/open",
        )
    return out


# Profile -----------------------------------------------------------------------------------


def cprofile(fake: FakeModel, tmp: Path, scenario: str, targets: list[str], **kw) -> None:
    """Run one scenario with each app target under cProfile (deterministic: exact call counts,
    so two checkouts can be compared call by call whatever else the machine is doing); the
    stats land in results/<target>-<scenario>.prof, read them with pstats."""
    for target in targets:
        root = app_root(target) or ROOT
        name = "app" if root == ROOT else f"app-{root.name}"
        out = RESULTS / f"{name}-{scenario}.prof"
        summary = one_run(target, scenario, fake, tmp, profile=out, **kw)
        print(f"{target}: {summary['completed']} replies, {summary['server_cpu_s']} s CPU -> {out}")


def profile(
    fake: FakeModel,
    tmp: Path,
    scenario: str,
    users: int | None,
    tokens: int | None,
    target: str = "app",
) -> None:
    """Run one scenario with the app under pyinstrument; print the hotspots.

    With few `tokens` (say 5) nearly all the time is what a message costs before its reply
    streams: the page, the POST, opening the stream and starting the run.
    """
    import pstats

    root = app_root(target) or ROOT
    name = "app" if root == ROOT else f"app-{root.name}"
    session = RESULTS / f"{name}-{scenario}.pyisession"
    summary = one_run(target, scenario, fake, tmp, users=users, tokens=tokens, profile=session)
    print(table(f"{scenario} under pyinstrument ({target})", {target: pooled([summary])}))
    text = RESULTS / f"{name}-{scenario}-profile.txt"
    stats = RESULTS / f"{name}-{scenario}.pstats"
    base = ["uv", "run", "--with", "pyinstrument", "pyinstrument", "--load", str(session)]
    subprocess.run(
        base + ["-r", "text", "-o", str(text), "--show-all", "-p", "unicode=false"],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    subprocess.run(base + ["-r", "pstats", "-o", str(stats)], cwd=ROOT, check=True, timeout=300)
    p = pstats.Stats(str(stats))
    total = max(v[3] for v in p.stats.values())
    print(f"\n== profile: top functions by self time (of {total:.1f} s sampled) ==")
    rows = sorted(p.stats.items(), key=lambda kv: -kv[1][2])[:25]
    for (file, lineno, fn), (_, _, tt, ct, _) in rows:
        short = file.split("site-packages/")[-1].replace(str(root) + "/", "")
        print(f"{tt:7.2f}s self {ct:7.2f}s cum  {short}:{lineno} {fn}")
    print("\n== profile: app functions by cumulative time ==")
    mine = [kv for kv in p.stats.items() if str(root) in kv[0][0] and ".venv" not in kv[0][0]]
    for (file, lineno, fn), (_, _, tt, ct, _) in sorted(mine, key=lambda kv: -kv[1][3])[:20]:
        print(f"{ct:7.2f}s cum {tt:7.2f}s self  {file.replace(str(root) + '/', '')}:{lineno} {fn}")
    print(f"\nfull call tree: {text}")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# Main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the scenarios, print the tables and the verdicts."""
    parser = argparse.ArgumentParser(description="App vs seed-001 baseline benchmark.")
    parser.add_argument("--scenario", default="all", choices=[*SCENARIOS, "open2000", "all"])
    parser.add_argument("--rounds", type=int, default=2, help="runs per target (alternating)")
    parser.add_argument(
        "--targets", default="app,baseline", help="comma list of app, baseline, baseline-nodebounce"
    )
    parser.add_argument("--users", type=int, help="override the scenario's user count")
    parser.add_argument("--tokens", type=int, help="override the scenario's reply length")
    parser.add_argument("--rate", type=float, help="override the scenario's tokens/s")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the app under --scenario (default throughput) instead",
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="run each app target under cProfile (call counts to compare checkouts)",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="diagnostic: run the app with tracemalloc and dump it when all streams are open",
    )
    parser.add_argument(
        "--accept-encoding",
        help="what app users send as Accept-Encoding (default: a browser's; 'identity' to "
        "measure the app without stream compression)",
    )
    args = parser.parse_args(argv)
    if args.tracemalloc:
        global TRACEMALLOC
        TRACEMALLOC = True
    if args.accept_encoding:
        load.BROWSER_ACCEPT_ENCODING = args.accept_encoding
    try:
        import uvloop

        uvloop.install()  # the load client's loop; the servers pick uvloop themselves
    except ImportError:
        pass
    _renice(-5)  # the load client (this process) too: its clock reads are the measurements
    RESULTS.mkdir(exist_ok=True)
    rev = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", ".", ":!bench"))
    print(f"app at {rev}{' (uncommitted changes)' if dirty else ''}, {os.cpu_count()} CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="chatbench-"))
    fake = FakeModel()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    report: dict[str, dict] = {}
    raw: list[dict] = []
    started = time.time()
    try:
        if args.cprofile:
            scenario = args.scenario if args.scenario in SCENARIOS else "throughput"
            cprofile(fake, tmp, scenario, targets, users=args.users, tokens=args.tokens)
            return
        if args.profile:
            scenario = args.scenario if args.scenario in SCENARIOS else "throughput"
            profile(fake, tmp, scenario, args.users, args.tokens, targets[0])
            return
        names = list(SCENARIOS) + ["open2000"] if args.scenario == "all" else [args.scenario]
        for name in names:
            if name == "open2000":
                result = open2000(fake, tmp)
                raw.append(result)
                report[name] = {"app": result}
                print(f"\n== open2000 {'=' * 60}")
                for k, v in result.items():
                    print(f"{k:38}{fmt(v):>20}")
                continue
            rounds = 1 if name == "streams" else args.rounds
            runs: dict[str, list[dict]] = {t: [] for t in targets}
            for r in range(rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                for target in order:
                    print(f"-- {name} round {r + 1}/{rounds}: {target}", flush=True)
                    s = one_run(
                        target,
                        name,
                        fake,
                        tmp,
                        users=args.users,
                        tokens=args.tokens,
                        rate=args.rate,
                    )
                    print(
                        f"   {s['completed']}/{s['users']} done, {s['replies_per_s']} replies/s,"
                        f" TTFT p95 {s['ttft_ms_p95']} ms, server CPU {s['server_cpu_s']} s"
                        f" ({s.get('server_cpu_settled_s')} s with titles),"
                        f" peak {s['server_peak_mb']} MB",
                        flush=True,
                    )
                    runs[target].append(s)
                    raw.append({k: v for k, v in s.items() if k != "_samples"})
                    raw[-1]["_timeline"] = raw[-1]["_timeline"][:1000]
            report[name] = {t: pooled(rs) for t, rs in runs.items() if rs}
            print(table(name, report[name]), flush=True)
        print("\n== targets " + "=" * 60)
        for v in verdicts(report):
            print(v)
    finally:
        fake.proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        clean = {
            s: {t: {k: v for k, v in d.items() if not k.startswith("_")} for t, d in by.items()}
            for s, by in report.items()
        }
        if clean:
            out = RESULTS / f"run-{stamp}.json"
            meta = {"commit": rev, "dirty": dirty, "cpus": os.cpu_count()}
            doc = {"meta": meta, "report": clean, "runs": raw}
            out.write_text(json.dumps(doc, indent=2, default=str))
            print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
