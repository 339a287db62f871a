"""Load client: N users at once drive a chat server's real HTTP flow and time every token.

App flow (what a browser with htmx does): GET / (session cookie) -> POST /send as htmx does
(form body, HX-Request) -> read `sse-connect="…"` from the returned HTML -> GET that URL with
Accept-Encoding: gzip and read the stream to its `done` event (and on to EOF, so every byte the
server sent is counted). Baseline flow (seed 001, Pattern 4): POST /chat with JSON and read to
`event: done`.

What is measured, per user:
- wire bytes: bytes read from the TCP socket (headers, chunk framing and body, compressed as sent),
  counted by wrapping httpcore's network stream; the POST response is counted separately;
- token arrival: the fake model's reply is known (fake_model.reply_tokens). For the baseline,
  token k has arrived once the JSON deltas add up to its end. For the app, each SSE event carries
  HTML; the client inflates the gzip stream itself (zlib), strips tags and counts letters on the
  page (finished blocks + current tail), and token k has arrived once that count reaches the
  letters the reply has up to k. Only tokens that put letters on the page are timed (287 of 300);
  the same tokens are timed for both servers;
- TTFT: from the start of the POST to the arrival of the first timed token;
- added gap: for consecutive timed tokens i < j, (arrival_j - arrival_i) minus the model's gap
  between them: its real send times when the fake model reports them (each prompt carries a
  `[bench:<tag>]` the fake model keys them by; perf_counter is CLOCK_MONOTONIC, one clock for
  every process), else (j - i) / rate; and token latency = arrival - model send time.

    uv run python bench/load.py --target app --url http://127.0.0.1:5001 --users 10 --tokens 300
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import html
import json
import re
import ssl
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from fake_model import reply_tokens, visible_letters  # noqa: E402

_TAGS = re.compile(r"<[^>]*>")
_LETTERS = re.compile(r"[A-Za-z]")
_SSE_CONNECT = re.compile(r'sse-connect="([^"]+)"')
_SSL = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # never used (loopback http); shared to save CPU
BROWSER_ACCEPT_ENCODING = "gzip, deflate, br, zstd"
PROMPT = "Explain how streaming a model's reply to a web page works, with a short example."


def page_letters(fragment: str) -> int:
    """Letters a fragment of HTML shows on the page."""
    return len(_LETTERS.findall(html.unescape(_TAGS.sub("", fragment))))


# Counting bytes on the socket ----------------------------------------------------------------


class Counter:
    """Bytes read from and written to the sockets of one user's client."""

    def __init__(self) -> None:
        self.read = 0
        self.written = 0


class _CountingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, counter: Counter):
        self._inner = inner
        self._counter = counter

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        self._counter.read += len(data)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._counter.written += len(buffer)
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, *args, **kwargs):  # pragma: no cover - loopback http only
        return await self._inner.start_tls(*args, **kwargs)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _CountingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, counter: Counter):
        self._inner = httpcore.AnyIOBackend()
        self._counter = counter

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CountingStream(stream, self._counter)

    async def connect_unix_socket(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def make_client(base_url: str, counter: Counter, timeout: float) -> httpx.AsyncClient:
    """One user's client: its own cookie jar and connection, every socket byte counted."""
    transport = httpx.AsyncHTTPTransport(verify=_SSL, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(
        network_backend=_CountingBackend(counter), max_connections=2, http1=True, http2=False
    )
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=httpx.Timeout(timeout),
        trust_env=False,
        headers={"User-Agent": "bench-load/1"},
    )


# The reply's known text ----------------------------------------------------------------------


@dataclass
class Reply:
    """The fake model's reply and, per timed token, the letters and characters it completes."""

    tokens: list[str]
    gap: float  # seconds between tokens at the model (0 = no delay)
    timed: list[int] = field(default_factory=list)  # token indices that put letters on the page
    need_letters: list[int] = field(default_factory=list)  # page letters once timed[j] shows
    need_chars: list[int] = field(default_factory=list)  # source chars once timed[j] is streamed

    def __post_init__(self) -> None:
        letters = chars = 0
        for i, (tok, n) in enumerate(zip(self.tokens, visible_letters(self.tokens), strict=True)):
            letters += n
            chars += len(tok)
            if n:
                self.timed.append(i)
                self.need_letters.append(letters)
                self.need_chars.append(chars)

    @classmethod
    def for_model(cls, tokens: int, rate: float) -> Reply:
        """The reply the fake model sends with `--tokens tokens --rate rate`."""
        return cls(reply_tokens(tokens), 1.0 / rate if rate > 0 else 0.0)

    @property
    def text_bytes(self) -> int:
        """Bytes of reply text (UTF-8): the denominator of wire bytes per reply text byte."""
        return len("".join(self.tokens).encode())


@dataclass
class UserResult:
    """What one user saw."""

    tag: str = ""  # in the prompt, so the fake model can report when it sent each token
    ok: bool = False
    error: str | None = None
    status: str | None = None
    t_start: float = 0.0
    t_post: float = 0.0
    t_open: float = 0.0  # SSE response headers received
    t_done: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # per timed token
    page_bytes: int = 0
    post_bytes: int = 0
    stream_wire_bytes: int = 0
    stream_body_bytes: int = 0  # after de-chunking, before inflating
    events: int = 0


class Gauge:
    """Live counts shared with the runner (streams open now, most open at once)."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.peak_at = 0.0  # perf_counter() when `peak` was first reached
        self.started = 0
        self.done = 0
        self.total = 0  # users in this run

    def opened(self) -> None:
        self.open += 1
        if self.open > self.peak:
            self.peak, self.peak_at = self.open, time.perf_counter()

    def closed(self) -> None:
        self.open -= 1


class _Progress:
    """Turns a growing amount of shown text into per-token arrival times."""

    def __init__(self, need: list[int], result: UserResult):
        self.need = need
        self.result = result

    def advance(self, have: int, now: float) -> None:
        arrivals, need = self.result.arrivals, self.need
        while len(arrivals) < len(need) and need[len(arrivals)] <= have:
            arrivals.append(now)


def _parse_event(raw: str) -> tuple[str, str] | None:
    name, data = "message", []
    for line in raw.split("\n"):
        if line.startswith(":") or not line:
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    return (name, "\n".join(data)) if data or name != "message" else None


async def _follow(resp: httpx.Response, on_event, result: UserResult, gauge: Gauge) -> None:
    """Read a reply's stream to EOF, counted as an open stream meanwhile."""
    resp.raise_for_status()
    result.t_open = time.perf_counter()
    gauge.opened()
    try:
        await _read_sse(resp, on_event, result)
    finally:
        gauge.closed()


def _settle(result: UserResult, reply: Reply) -> UserResult:
    """A user's outcome: complete, with every token of the known reply, or why not."""
    result.ok = result.status == "complete" and len(result.arrivals) == len(reply.timed)
    if not result.ok and result.error is None:
        result.error = f"status={result.status} tokens={len(result.arrivals)}/{len(reply.timed)}"
    return result


async def _read_sse(resp: httpx.Response, on_event, result: UserResult) -> None:
    """Read an SSE response to EOF, inflating gzip by hand; call on_event(name, data, t)."""
    gzip = resp.headers.get("content-encoding") == "gzip"
    inflate = zlib.decompressobj(31) if gzip else None
    text = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    async for raw in resp.aiter_raw():
        now = time.perf_counter()
        result.stream_body_bytes += len(raw)
        buf += text.decode(inflate.decompress(raw) if inflate else raw)
        while (cut := buf.find("\n\n")) >= 0:
            block, buf = buf[:cut], buf[cut + 2 :]
            event = _parse_event(block)
            if event is not None:
                result.events += 1
                on_event(*event, now)


async def app_user(
    base: str, reply: Reply, gauge: Gauge, timeout: float, tag: str, fresh_stream: bool = False
) -> UserResult:
    """One browser: GET /, POST /send as htmx does, then follow the reply's SSE stream (with
    `fresh_stream`, on a new connection, so it may reach another worker than the send did)."""
    result, counter = UserResult(tag=tag), Counter()
    progress = _Progress(reply.need_letters, result)
    blocks = 0

    def on_event(name: str, data: str, now: float) -> None:
        nonlocal blocks
        if name == "blocks":
            blocks += page_letters(data)  # the tail event that follows shows the new total
        elif name == "tail":
            progress.advance(blocks + page_letters(data), now)
        elif name == "end":
            progress.advance(blocks, now)
        elif name == "done":
            result.status = data
            result.t_done = now

    async with make_client(base, counter, timeout) as client:
        result.t_start = time.perf_counter()
        page = await client.get("/", headers={"Accept": "text/html"})
        page.raise_for_status()
        result.page_bytes = counter.read
        mark = counter.read
        result.t_post = time.perf_counter()
        host = base.split("://", 1)[1]
        sent = await client.post(
            "/send",
            data={"msg": f"{PROMPT} [bench:{tag}]", "cid": ""},
            headers={
                "HX-Request": "true",
                "HX-Current-URL": base + "/",
                "HX-Target": "messages",
                "HX-Trigger": "composer",
                "Origin": f"http://{host}",
                "Sec-Fetch-Site": "same-origin",
                "Accept": "*/*",
                # The server closes the connection after this response: the stream connects anew.
                **({"Connection": "close"} if fresh_stream else {}),
            },
        )
        sent.raise_for_status()
        result.post_bytes = counter.read - mark
        found = _SSE_CONNECT.search(sent.text)
        if not found:
            raise RuntimeError("no sse-connect in the POST response")
        url = html.unescape(found.group(1))
        mark = counter.read
        headers = {
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
            "Accept-Encoding": BROWSER_ACCEPT_ENCODING,
        }
        async with client.stream("GET", url, headers=headers) as resp:
            await _follow(resp, on_event, result, gauge)
        result.stream_wire_bytes = counter.read - mark
    return _settle(result, reply)


async def baseline_user(base: str, reply: Reply, gauge: Gauge, timeout: float, tag: str):
    """One client of the seed server: POST /chat (JSON) and read the stream to `event: done`."""
    result, counter = UserResult(tag=tag), Counter()
    progress = _Progress(reply.need_chars, result)
    chars = 0

    def on_event(name: str, data: str, now: float) -> None:
        nonlocal chars
        if name == "message":
            chars += len(json.loads(data)["text"])
            progress.advance(chars, now)
        elif name == "done":
            result.status = "complete"
            result.t_done = now

    async with make_client(base, counter, timeout) as client:
        result.t_start = result.t_post = time.perf_counter()
        body = {"session_id": f"bench-{tag}", "message": f"{PROMPT} [bench:{tag}]"}
        mark = counter.read
        async with client.stream("POST", "/chat", json=body) as resp:
            await _follow(resp, on_event, result, gauge)
        result.stream_wire_bytes = counter.read - mark
    return _settle(result, reply)


async def _guarded(coro, gauge: Gauge, timeout: float, tag: str) -> UserResult:
    gauge.started += 1
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except BaseException as exc:  # noqa: BLE001 - every failure is a data point
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return UserResult(tag=tag, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        gauge.done += 1


async def run_load(
    target: str,
    base: str,
    users: int,
    reply: Reply,
    *,
    timeout: float = 120.0,
    gauge: Gauge | None = None,
    ramp: float = 0.0,
    model_url: str | None = None,
    fresh_stream: bool = False,
) -> dict:
    """Start `users` users against `target` ('app' or 'baseline'), all at once or spread evenly
    over `ramp` seconds; summarise. With `model_url` (the fake model), gaps and latencies are
    measured against the times the model really sent each token. `fresh_stream`: each app user's
    stream goes on a new connection (see app_user)."""
    gauge = gauge or Gauge()
    cpu0, t0 = time.process_time(), time.perf_counter()
    run_tag = f"{target[0]}{time.monotonic_ns() % 10**9}"
    gauge.total = users

    async def user(i: int) -> UserResult:
        if ramp:
            await asyncio.sleep(i * ramp / users)
        tag = f"{run_tag}-{i}"
        if target == "app":
            coro = app_user(base, reply, gauge, timeout, tag, fresh_stream)
        else:
            coro = baseline_user(base, reply, gauge, timeout, tag)
        return await _guarded(coro, gauge, timeout, tag)

    results = await asyncio.gather(*(user(i) for i in range(users)))
    wall = time.perf_counter() - t0
    sends = {}
    if model_url:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            stats = await client.get(f"{model_url}/stats", params={"sends": 1})
            sends = stats.json().get("sends", {})
    summary = summarise(results, reply, wall, t0, sends)
    summary["client_cpu_s"] = round(time.process_time() - cpu0, 2)
    summary["peak_open_streams"] = gauge.peak
    summary["s_to_peak_open"] = round(gauge.peak_at - t0, 2) if gauge.peak else None
    return summary


# Summaries ------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100) of `values`; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def gaps(result: UserResult, reply: Reply, sent: list[float] | None = None) -> list[float]:
    """Added gap (seconds) between consecutive timed tokens of one reply: observed gap minus
    the model's gap (its real send times if known, else its schedule)."""
    a, idx = result.arrivals, reply.timed
    if sent is not None and len(sent) == len(reply.tokens):
        return [(a[j] - a[j - 1]) - (sent[idx[j]] - sent[idx[j - 1]]) for j in range(1, len(a))]
    return [(a[j] - a[j - 1]) - (idx[j] - idx[j - 1]) * reply.gap for j in range(1, len(a))]


def latencies(result: UserResult, reply: Reply, sent: list[float] | None) -> list[float]:
    """Per timed token: arrival at the client minus the model's send time (same clock)."""
    if sent is None or len(sent) != len(reply.tokens):
        return []
    return [a - sent[i] for a, i in zip(result.arrivals, reply.timed, strict=False)]


def summarise(
    results: list[UserResult],
    reply: Reply,
    wall: float,
    t0: float = 0.0,
    sends: dict[str, list[float]] | None = None,
) -> dict:
    """Aggregate figures for one run (raw samples kept under `_samples` for pooling)."""
    sends = sends or {}
    ok = [r for r in results if r.ok]
    ttft = [r.arrivals[0] - r.t_post for r in ok if r.arrivals]
    per_user = [gaps(r, reply, sends.get(r.tag)) for r in ok]
    added = [g for user in per_user for g in user]
    stalls = [max(user, default=0.0) for user in per_user]
    latency = [x for r in ok for x in latencies(r, reply, sends.get(r.tag))]
    matched = sum(1 for r in ok if len(sends.get(r.tag) or ()) == len(reply.tokens))
    text = reply.text_bytes * len(ok)
    span = (max(r.t_done for r in ok) - min(r.t_start for r in ok)) if ok else wall
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    return {
        "users": len(results),
        "completed": len(ok),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "wall_s": round(span, 3),
        "replies_per_s": round(len(ok) / span, 2) if ok and span > 0 else 0.0,
        "ttft_ms_p50": _ms(percentile(ttft, 50)),
        "ttft_ms_p95": _ms(percentile(ttft, 95)),
        "added_gap_ms_p50": _ms(percentile(added, 50)),
        "added_gap_ms_p99": _ms(percentile(added, 99)),
        "gaps_vs_model_sends": f"{matched}/{len(ok)}",
        "token_latency_ms_p50": _ms(percentile(latency, 50)),
        "token_latency_ms_p99": _ms(percentile(latency, 99)),
        "stall_ms_p50": _ms(percentile(stalls, 50)),
        "stall_ms_max": _ms(max(stalls, default=None) if stalls else None),
        "reply_text_bytes": reply.text_bytes,
        "wire_bytes_per_reply": round(sum(r.stream_wire_bytes for r in ok) / len(ok)) if ok else 0,
        "wire_per_text_byte": round(sum(r.stream_wire_bytes for r in ok) / text, 3) if ok else None,
        "body_per_text_byte": round(sum(r.stream_body_bytes for r in ok) / text, 3) if ok else None,
        "post_bytes_per_reply": round(sum(r.post_bytes for r in ok) / len(ok)) if ok else 0,
        "page_bytes_per_user": round(sum(r.page_bytes for r in ok) / len(ok)) if ok else 0,
        "events_per_reply": round(sum(r.events for r in ok) / len(ok), 1) if ok else 0,
        "stream_open_ms_p50": _ms(percentile([r.t_open - r.t_post for r in ok], 50)),
        "stream_open_ms_p95": _ms(percentile([r.t_open - r.t_post for r in ok], 95)),
        "_samples": {"ttft": ttft, "added": added, "latency": latency},
        "_timeline": [
            [round(x - t0, 3) for x in (r.t_start, r.t_post, r.t_open, r.arrivals[0], r.t_done)]
            for r in ok
            if r.arrivals
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Run one load against an already running server and print the summary as JSON."""
    parser = argparse.ArgumentParser(description="Chat load client (one run).")
    parser.add_argument("--target", choices=["app", "baseline"], default="app")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:5001")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=300, help="the fake model's --tokens")
    parser.add_argument("--rate", type=float, default=0, help="the fake model's --rate")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--ramp", type=float, default=0, help="start users over this many s")
    parser.add_argument("--model-url", help="the fake model's base URL, to use its send times")
    args = parser.parse_args(argv)
    reply = Reply.for_model(args.tokens, args.rate)
    summary = asyncio.run(
        run_load(
            args.target,
            args.url.rstrip("/"),
            args.users,
            reply,
            timeout=args.timeout,
            ramp=args.ramp,
            model_url=args.model_url,
        )
    )
    summary.pop("_samples")
    summary.pop("_timeline")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
