"""Can one user stall everyone? `/health` latency on one connection while another user does the
heaviest thing each route allows.

    uv run python bench/stall.py                 # every phase (about two minutes on 2 cores)
    uv run python bench/stall.py --turns 2000    # a smaller import

One app (fresh SQLite file, the fake model on loopback) and two users. The prober sends
`GET /health` one after another on one keep-alive connection, 20 ms apart, for the whole run.
The heavy user, phase by phase: imports the largest conversation the import allows (just under
MAX_IMPORT_BYTES and MAX_IMPORT_TURNS), opens it at its first turn (`?at=`, a search hit),
sends messages into it (its whole history goes to the model), gets a reply of pathological
Markdown (live, then reopened from storage), searches, and exports it. Each phase is bounded in
count and time. Printed: per phase, /health p50/p95/p99/max and how long the heavy requests
took; the target is /health p99 < 100 ms in every phase. JSON lands in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from load import percentile  # noqa: E402
from run import RESULTS, FakeModel, _git, start_server  # noqa: E402

HTMX = {"HX-Request": "true"}
TARGET_P99_MS = 100.0


def big_export(turns: int, limit: int) -> bytes:
    """An exported conversation of up to `turns` turns, under `limit` bytes (the import's cap)."""
    from pydantic_ai.messages import (
        ModelMessagesTypeAdapter,
        ModelRequest,
        ModelResponse,
        TextPart,
        UserPromptPart,
    )

    def build(n: int, pad: int = 0) -> bytes:
        messages = []
        filler = "and more words about it " * (pad // 24)
        for i in range(n):
            messages.append(ModelRequest(parts=[UserPromptPart(content=f"Question {i} about x")]))
            text = f"Answer {i}: **bold**, `code` and a [link](https://example.org/{i}). {filler}"
            messages.append(ModelResponse(parts=[TextPart(content=text)]))
        return ModelMessagesTypeAdapter.dump_json(messages)

    raw = build(turns)
    while len(raw) > limit:  # too many turns for the size cap: fewer, until it fits
        turns = int(turns * limit / len(raw) * 0.98)
        raw = build(turns)
    # Fewer turns than the size cap allows: make each reply longer, up to the cap.
    pad = int((limit - len(raw)) / turns * 0.97)
    return build(turns, pad) if pad >= 24 else raw


class Prober:
    """GET /health in a loop on one connection; latencies are filed under the current phase."""

    def __init__(self, base: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=base, timeout=60, limits=httpx.Limits(max_connections=1)
        )
        self.phase = "warm-up"
        self.samples: dict[str, list[float]] = {}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            phase, t = self.phase, time.perf_counter()
            r = await self.client.get("/health")
            took = time.perf_counter() - t
            r.raise_for_status()
            self.samples.setdefault(phase, []).append(took)
            await asyncio.sleep(0.02)
        await self.client.aclose()


async def read_stream(client: httpx.AsyncClient, url: str) -> None:
    async with client.stream("GET", url) as resp:
        async for _ in resp.aiter_raw():
            pass


async def send(client: httpx.AsyncClient, msg: str, cid: str = "") -> tuple[str, float]:
    """Send a message and read its reply to the end; (conversation id, seconds)."""
    t = time.perf_counter()
    r = await client.post("/send", data={"msg": msg, "cid": cid}, headers=HTMX)
    r.raise_for_status()
    stream = re.search(r'sse-connect="([^"]+)"', r.text).group(1)
    await read_stream(client, stream)
    cid = cid or r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    return cid, time.perf_counter() - t


async def timed(coro) -> float:
    t = time.perf_counter()
    r = await coro
    if isinstance(r, httpx.Response):
        r.raise_for_status()
    return time.perf_counter() - t


async def scenario(base: str, fake_url: str, turns: int, limit: int) -> dict:
    prober = Prober(base)
    heavy = httpx.AsyncClient(base_url=base, timeout=120)
    probe = asyncio.create_task(prober.run())
    heavy_s: dict[str, list[float]] = {}

    def phase(name: str) -> list[float]:
        prober.phase = name
        return heavy_s.setdefault(name, [])

    try:
        phase("idle")
        (await heavy.get("/")).raise_for_status()
        await asyncio.sleep(3)

        raw = big_export(turns, limit)
        took = phase("import")
        files = {"file": ("big.json", raw, "application/json")}
        r = await heavy.post("/import", files=files, headers=HTMX)
        r.raise_for_status()
        cid = r.headers["HX-Redirect"].rsplit("/", 1)[1]
        took.append(r.elapsed.total_seconds())
        page = (await heavy.get(f"/c/{cid}")).text
        ids = [int(x) for x in re.findall(r'id="turn-(\d+)"', page)]
        first = min(ids) - (int(re.findall(r"Question (\d+) about", page)[0]))

        took = phase("open ?at= first turn")
        for _ in range(10):
            took.append(await timed(heavy.get(f"/c/{cid}", params={"at": first})))

        took = phase("send into it")
        for i in range(3):
            took.append((await send(heavy, f"One more question, number {i}", cid))[1])

        took = phase("search")
        for q in ("question", "answer bold", "link example"):
            for _ in range(5):
                took.append(await timed(heavy.get("/search", params={"q": q})))

        took = phase("export")
        for _ in range(2):
            took.append(await timed(heavy.get(f"/c/{cid}/export.md")))
            took.append(await timed(heavy.get(f"/c/{cid}/export.json")))

        took = phase("pathological reply, live")
        async with httpx.AsyncClient() as c:
            cfg = {"tokens": 1200, "rate": 0, "kind": "brackets"}
            (await c.post(f"{fake_url}/config", params=cfg)).raise_for_status()
        odd, t = await send(heavy, "Answer with brackets")
        took.append(t)
        took = phase("pathological reply, reopened")
        for _ in range(3):
            took.append(await timed(heavy.get(f"/c/{odd}")))

        phase("idle again")
        await asyncio.sleep(2)
    finally:
        prober.stop.set()
        await probe
        await heavy.aclose()

    out = {}
    for name, xs in prober.samples.items():
        if name == "warm-up":
            continue
        ms = [x * 1000 for x in xs]
        out[name] = {
            "health_n": len(ms),
            "health_ms_p50": round(percentile(ms, 50), 1),
            "health_ms_p95": round(percentile(ms, 95), 1),
            "health_ms_p99": round(percentile(ms, 99), 1),
            "health_ms_max": round(max(ms), 1),
            "heavy_n": len(heavy_s.get(name, [])),
            "heavy_s_max": round(max(heavy_s[name]), 2) if heavy_s.get(name) else None,
        }
    out["_import"] = {"bytes": len(raw), "turns": raw.count(b'"user-prompt"')}
    return out


def main(argv: list[str] | None = None) -> None:
    """Start the fake model and the app, run the phases, print the table, save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--turns",
        type=int,
        help="turns in the import (default: as many as MAX_IMPORT_TURNS allows)",
    )
    args = parser.parse_args(argv)
    from chat.config import Settings
    from chat.transcript import MAX_IMPORT_BYTES

    # The heaviest import the app accepts: as many turns as its default cap, within its size cap.
    args.turns = args.turns or Settings().max_import_turns

    rev = _git("rev-parse", "--short", "HEAD")
    print(f"app at {rev}")
    tmp = Path(tempfile.mkdtemp(prefix="chatstall-"))
    fake = FakeModel()
    try:
        fake.configure(300, 0)
        proc = start_server("app", fake, tmp)
        try:
            base = f"http://127.0.0.1:{proc.port}"
            result = asyncio.run(scenario(base, fake.url, args.turns, MAX_IMPORT_BYTES - 1000))
        finally:
            proc.stop()
    finally:
        fake.proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    imp = result.pop("_import")
    print(f"import: {imp['turns']} turns, {imp['bytes'] / 1e6:.1f} MB")
    cols = ("health_n", "health_ms_p50", "health_ms_p95", "health_ms_p99", "health_ms_max")
    print(f"{'phase':32}" + "".join(f"{c.replace('health_', ''):>10}" for c in cols) + "  heavy")
    ok = True
    for name, row in result.items():
        heavy = f"{row['heavy_n']} × ≤{row['heavy_s_max']} s" if row["heavy_n"] else ""
        print(f"{name:32}" + "".join(f"{row[c]:>10}" for c in cols) + f"  {heavy}")
        ok &= row["health_ms_p99"] < TARGET_P99_MS
    print(f"{'PASS' if ok else 'FAIL'}: /health p99 < {TARGET_P99_MS:.0f} ms in every phase")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"stall-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": rev, "import": imp, "phases": result}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
