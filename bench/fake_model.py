"""A fake OpenAI-compatible chat-completions server for benchmarks, on loopback only.

Every request gets the same reply: `--tokens` tokens of realistic Markdown (a heading, paragraphs,
a list and a fenced code block), streamed as `chat.completion.chunk` events with a final usage
chunk, either as fast as possible (`--rate 0`) or paced at `--rate` tokens per second per stream.
Pacing follows an absolute schedule (token i is due at t0 + i/rate), so lateness never accumulates;
`GET /stats` reports how late the sends actually were, so a benchmark can tell the fake model's
own jitter from the server's. A prompt tagged `[bench:<id>]` has the send time of each of its
tokens recorded (`GET /stats?sends=1`), so the load client can subtract the model's real
timing from what it observed.

    uv run python bench/fake_model.py --port 8100 --tokens 300 --rate 50

The reply is deterministic and importable (`reply_tokens`), so a load client knows the text.
`POST /config?tokens=N&rate=R` changes length and pace between runs (the runner warms servers
up at full speed first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

PARAGRAPHS = [
    "Streaming a reply token by token keeps the page responsive while the model is still "
    "thinking, and it lets the reader start on the first paragraph before the last one exists. "
    "The server only has to pass each piece along as soon as it arrives.",
    "There are a few things worth checking before you deploy this to production. Most of them "
    "are about what happens when a connection drops halfway through a long answer, and whether "
    "the text that was already shown is kept somewhere safe.",
    "In short, measure before you optimise. A small benchmark that drives the real HTTP flow "
    "with many users at once will show where the time goes far better than a guess will.",
    "Compression matters more than it seems for streamed **Markdown**, because every update "
    "repeats most of the markup around it. With a shared window the repeats cost a few bytes.",
]
HEADINGS = ["## How streaming works", "### A worked example", "## What to check next"]
LIST_ITEMS = [
    "Keep the **event loop** free: never block it on disk or the network.",
    "Flush each event at once, so the reader sees every token without delay.",
    "Save the partial reply often enough that a crash loses only a second or two.",
    "Let a reconnecting browser replay what it missed instead of starting over.",
    "Cap the size of each message, and say so plainly when a limit is reached.",
]
CODE = """```python
async def stream_reply(agent, prompt):
    async with agent.run_stream(prompt) as result:
        async for delta in result.stream_text(delta=True):
            if delta and len(delta) < 4096:
                yield delta
```"""
_TOKEN = re.compile(r"\s*\S+")
# The app asks its model for a conversation title after the first exchange; a real model answers
# in a few tokens, so the fake one does too (asked with instructions that mention a title).
TITLE = ["Streaming", " replies", " to", " the", " browser"]
_LETTERS = re.compile(r"[A-Za-z]")


def _blocks():
    """An endless, repeating sequence of Markdown blocks that reads like a model's answer."""
    i = 0
    while True:
        yield HEADINGS[i % len(HEADINGS)]
        yield PARAGRAPHS[i % len(PARAGRAPHS)]
        yield "\n".join(f"- {item}" for item in LIST_ITEMS[: 3 + i % 3])
        yield PARAGRAPHS[(i + 1) % len(PARAGRAPHS)]
        yield CODE
        yield PARAGRAPHS[(i + 2) % len(PARAGRAPHS)]
        i += 1


def reply_tokens(n: int) -> list[str]:
    """Exactly `n` tokens of Markdown; joined, they are the reply. Each token keeps its leading
    whitespace, as model tokens do. A block that does not fit is replaced by a shorter paragraph,
    so the reply never ends inside a code fence."""
    tokens: list[str] = []
    for block in _blocks():
        room = n - len(tokens)
        if room <= 0:
            break
        sep = "\n\n" if tokens else ""
        words = _TOKEN.findall(sep + block)
        if len(words) > room:
            filler = " ".join(" ".join(PARAGRAPHS).split()[:room])
            words = _TOKEN.findall(sep + filler)
        tokens.extend(words[:room])
    return tokens


def pathological_tokens(n: int) -> list[str]:
    """`n` tokens of link brackets that never close until the end: seconds per 100 kB for
    markdown-it-py without a budget."""
    half = max(1, n // 2)
    return ["[" * 100] * half + ["a"] + ["]" * 100] * half


def visible_letters(tokens: list[str]) -> list[int]:
    """Letters each token adds to the rendered page. A fence's info string (```python) is not
    shown, everything else with letters is; load.py uses this to read progress from HTML."""
    return [0 if t.lstrip().startswith("```") else len(_LETTERS.findall(t)) for t in tokens]


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class FakeModel:
    """The ASGI app: POST /v1/chat/completions (streamed or not), GET /stats."""

    def __init__(self, tokens: int, rate: float):
        self.configure(tokens, rate)
        self.lateness: list[float] = []  # seconds each paced send went out after its due time
        self.requests = 0
        self.title_requests = 0
        self.active = 0
        self.peak_active = 0
        # perf_counter() (CLOCK_MONOTONIC, shared by every process on the machine) at which each
        # token of a tagged reply was handed to the socket, keyed by the tag in the prompt.
        self.sends: dict[str, list[float]] = {}

    def configure(self, tokens: int, rate: float, kind: str = "markdown") -> None:
        """Set the reply length and pace (also reachable as POST /config?tokens=N&rate=R).

        `kind=brackets` answers with Markdown that is slow to parse instead (N tokens of 100
        unclosed brackets, then as many closing ones): the worst reply bench/stall.py sends.
        """
        self.tokens = reply_tokens(tokens) if kind == "markdown" else pathological_tokens(tokens)
        self.text = "".join(self.tokens)
        self.gap = 1.0 / rate if rate > 0 else 0.0
        self.head = _chunk({"role": "assistant", "content": ""})
        self.chunks = [_chunk({"content": t}) for t in self.tokens]
        self.stop = _chunk({}, "stop")
        self.title_chunks = [_chunk({"content": t}) for t in TITLE]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["method"] == "GET" and path == "/stats":
            await self._stats(scope, send)
        elif scope["method"] == "POST" and path == "/config":
            # The runner warms a server up at full speed, then sets the scenario's pace.
            query = dict(
                kv.split("=", 1) for kv in scope["query_string"].decode().split("&") if "=" in kv
            )
            self.configure(
                int(query.get("tokens", len(self.tokens))),
                float(query.get("rate", 0)),
                query.get("kind", "markdown"),
            )
            await _send_json(send, {"tokens": len(self.tokens), "gap_ms": self.gap * 1000})
        elif scope["method"] == "POST" and path.endswith("/chat/completions"):
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            await self._complete(json.loads(body or b"{}"), send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not found"})

    def _usage(self, request: dict, n: int) -> dict:
        prompt = sum(
            len(str(m.get("content") or "").split()) + 4 for m in request.get("messages", [])
        )
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

    async def _complete(self, request: dict, send) -> None:
        title = _asks_for_title(request)
        tag = None if title else _tag(request)
        times: list[float] | None = None
        if tag is not None and len(self.sends) < 100_000:
            times = self.sends[tag] = []
        self.requests += 1
        self.title_requests += title
        if not request.get("stream"):
            body = {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(TITLE) if title else self.text,
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": self._usage(request, len(TITLE) if title else len(self.tokens)),
            }
            await _send_json(send, body)
            return
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": self.head, "more_body": True})
            # Taken once, so a /config mid-stream does not mix replies.
            chunks, gap = (self.title_chunks if title else self.chunks), self.gap
            start = time.perf_counter()  # uvloop's loop.time() is cached at 1 ms granularity
            for i, chunk in enumerate(chunks):
                if gap and i:
                    due = start + i * gap
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if len(self.lateness) < 2_000_000:
                        self.lateness.append(time.perf_counter() - due)
                if times is not None:
                    times.append(time.perf_counter())
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            usage = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": "fake",
                "choices": [],
                "usage": self._usage(request, len(chunks)),
            }
            tail = self.stop + b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            self.active -= 1

    async def _stats(self, scope, send) -> None:
        late = sorted(self.lateness)

        def pct(p: float) -> float | None:
            return round(late[min(len(late) - 1, int(p * len(late)))] * 1000, 3) if late else None

        body = {
            "requests": self.requests,
            "title_requests": self.title_requests,
            "active": self.active,
            "peak_active": self.peak_active,
            "tokens": len(self.tokens),
            "gap_ms": self.gap * 1000,
            "paced_sends": len(late),
            "late_ms_p50": pct(0.50),
            "late_ms_p99": pct(0.99),
            "late_ms_max": round(late[-1] * 1000, 3) if late else None,
        }
        if b"sends" in scope.get("query_string", b""):
            body["sends"] = self.sends
        if b"reset" in scope.get("query_string", b""):
            self.lateness.clear()
            self.sends = {}
            self.requests = self.title_requests = 0
            self.peak_active = self.active
        await _send_json(send, body)


_TAG = re.compile(r"\[bench:([\w.-]+)\]")


def _tag(request: dict) -> str | None:
    """The load client's tag for this user (`[bench:…]` in the last user message), if any."""
    for m in reversed(request.get("messages", [])):
        if m.get("role") == "user":
            found = _TAG.search(str(m.get("content", "")))
            return found.group(1) if found else None
    return None


def _asks_for_title(request: dict) -> bool:
    """True for the app's title request: its system/developer message mentions a title."""
    return any(
        m.get("role") in ("system", "developer") and "title" in str(m.get("content", "")).lower()
        for m in request.get("messages", [])
    )


async def _send_json(send, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    """Serve the fake model on loopback until interrupted."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--tokens", type=int, default=300, help="tokens per reply")
    parser.add_argument("--rate", type=float, default=0, help="tokens/s per stream; 0 = no delay")
    args = parser.parse_args(argv)
    uvicorn.run(
        FakeModel(args.tokens, args.rate),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
