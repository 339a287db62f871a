"""A fake OpenAI-compatible chat-completions server on loopback, for e2e tests and benchmarks.

Standard library only: a small HTTP/1.1 server on asyncio, run in a background thread with its own
event loop, so any test (sync or async) or script can use it. It answers
`POST /v1/chat/completions` by streaming `chat.completion.chunk` server-sent events (or one JSON
completion when `stream` is false), ending with a usage chunk when `stream_options.include_usage`
asks for one, then `data: [DONE]`.

Per test it can be told what to say (`reply`, `tokens`), how fast (`delay` per token), to pause
mid-reply until released (`hold_after`), and to fail: `script` is a list of `Fault`s (or None for
a normal answer) consumed one per request, and `fault` applies to every request after that.
Hostile upstreams are faults too: `Fault.deltas` streams chunk deltas exactly as given (text
with lone surrogates, tool calls with absurd arguments or duplicate ids), and `Fault.endless`
streams text for ever, ignoring the request's max_tokens, until the client hangs up.
`side_reply` may answer some requests at once with a fixed text, outside the script, delay and
hold (an app's background calls, e.g. writing a conversation title, then cannot eat a fault).
`report_usage=False` sends no token usage at all, as llama.cpp's server and some other local
servers do (no usage chunk in a stream even when asked, no `usage` in a completion).
`done_linger` keeps a stream's body open that many seconds after `data: [DONE]`, as llama.cpp's
server (sse-starlette) does, so a client must not treat [DONE] as the end of the body.

It records every request: the JSON body (so the messages, i.e. the history the client sent), how
many tokens were sent, whether the reply completed, and whether the client disconnected first.

    with FakeOpenAI("Hello **there**", delay=0.01) as fake:
        ...  # point OPENAI_BASE_URL at fake.base_url, MODEL=openai-chat:fake-model
        assert len(fake.requests) == 1

Standalone, e.g. for a benchmark:
`python tests/fake_openai.py --port 8011 --tokens 400 --delay 0.01`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

DEFAULT_REPLY = "Hello from the fake model."
_TOKEN = re.compile(r"\s*\S+\s*|\s+")
_MAX_HEAD = 64 * 1024
_HOLD_LIMIT = 60.0  # a held reply resumes by itself after this long, so nothing hangs forever


def split_tokens(text: str) -> list[str]:
    """Split text into the pieces streamed one per chunk: words with their surrounding spaces."""
    pieces = _TOKEN.findall(text)
    return pieces or [text]


@dataclass(frozen=True)
class Fault:
    """One way for a request to go wrong. Build with `http`, `cut`, `malformed` or `hang`."""

    kind: str  # "http" | "cut" | "malformed" | "hang" | "deltas" | "endless"
    status: int = 500
    retry_after: str | None = None
    after: int = 0  # tokens streamed before a cut or malformed chunk
    message: str = "fake upstream failure"
    chunks: tuple = ()  # for "deltas": the `delta` objects to stream, in order
    finish: str = "stop"  # for "deltas": the finish_reason of the last chunk

    @classmethod
    def http(
        cls, status: int, *, retry_after: float | str | None = None, message: str = ""
    ) -> Fault:
        """Answer with an OpenAI-style JSON error and this status (429 may carry Retry-After)."""
        return cls(
            "http",
            status=status,
            retry_after=None if retry_after is None else str(retry_after),
            message=message or HTTPStatus(status).phrase,
        )

    @classmethod
    def cut(cls, after: int = 1) -> Fault:
        """Start streaming, send `after` tokens, then drop the connection mid-body."""
        return cls("cut", after=after)

    @classmethod
    def malformed(cls, after: int = 1) -> Fault:
        """Start streaming, send `after` tokens, then a chunk that is not JSON."""
        return cls("malformed", after=after)

    @classmethod
    def empty(cls) -> Fault:
        """Answer 200 with a stream that ends at once: no chunk, no [DONE]. llama.cpp's server
        does this when the prompt is longer than its context window."""
        return cls("empty")

    @classmethod
    def deltas(cls, *deltas: dict, finish: str = "stop") -> Fault:
        """Stream these chunk deltas verbatim (JSON-encoded as Python does: a lone surrogate goes
        out as a `\\udXXX` escape), then `finish`, a usage chunk if asked for, and [DONE]."""
        return cls("deltas", chunks=tuple(deltas), finish=finish)

    @classmethod
    def tool_calls(cls, *calls: tuple[str, str, str]) -> Fault:
        """One response calling tools: (id, name, raw JSON arguments) each, in one chunk each."""
        return cls.deltas(
            *(
                {"tool_calls": [{"index": i, "id": cid, "type": "function",
                                 "function": {"name": name, "arguments": args}}]}
                for i, (cid, name, args) in enumerate(calls)
            ),
            finish="tool_calls",
        )  # fmt: skip

    @classmethod
    def endless(cls) -> Fault:
        """Stream the reply's words over and over, never stopping, whatever max_tokens says."""
        return cls("endless")

    @classmethod
    def hang(cls) -> Fault:
        """Accept the request and never answer until released or disconnected."""
        return cls("hang")


@dataclass
class Recorded:
    """One request the fake server received, and what became of its reply."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict
    fault: Fault | None = None
    tokens_sent: int = 0
    completed: bool = False  # the whole reply was written, through [DONE]
    disconnected: bool = False  # the client went away before the reply finished
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def messages(self) -> list[dict]:
        """The chat messages the client sent (its whole history for this request)."""
        return list(self.body.get("messages") or [])

    @property
    def finished(self) -> bool:
        """True once the server is done with this request, however it ended."""
        return self._done.is_set()

    def texts(self, role: str) -> list[str]:
        """The text of every message with `role` ('user', 'assistant', 'system', ...), in order."""
        out = []
        for m in self.messages:
            if m.get("role") != role:
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append(content or "")
        return out


ReplyFn = Callable[[dict], str]


class FakeOpenAI:
    """A loopback OpenAI-compatible server. Configure it, point a client at `base_url`, inspect."""

    def __init__(
        self,
        reply: str | ReplyFn = DEFAULT_REPLY,
        *,
        delay: float = 0.0,
        tokens: int | None = None,
        hold_after: int | None = None,
        script: list[Fault | None] | None = None,
        fault: Fault | None = None,
        side_reply: Callable[[dict], str | None] | None = None,
        report_usage: bool = True,
        model: str = "fake-model",
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.host, self.port = host, port
        self.model = model
        self.side_reply = side_reply
        self.report_usage = self._report_usage = report_usage
        self.done_linger = 0.0
        self._defaults = dict(
            reply=reply,
            delay=delay,
            tokens=tokens,
            hold_after=hold_after,
            script=list(script or []),
            fault=fault,
        )
        self._lock = threading.Condition()
        self._records: list[Recorded] = []
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        self.reply, self.delay, self.tokens = reply, delay, tokens
        self.hold_after, self.script, self.fault = hold_after, list(script or []), fault

    # Configuration ---------------------------------------------------------------------------

    def configure(
        self,
        reply: str | ReplyFn | None = None,
        *,
        delay: float | None = None,
        tokens: int | None = None,
        hold_after: int | None = None,
        script: list[Fault | None] | None = None,
        fault: Fault | None = None,
    ) -> FakeOpenAI:
        """Set how the following requests are answered. Only the arguments given change."""
        with self._lock:
            if reply is not None:
                self.reply = reply
            if delay is not None:
                self.delay = delay
            if tokens is not None:
                self.tokens = tokens
            if hold_after is not None:
                self.hold_after = hold_after
                self._release.clear()
                self._held.clear()
            if script is not None:
                self.script = list(script)
            if fault is not None:
                self.fault = fault
        return self

    def reset(self, timeout: float = 10.0) -> None:
        """Back to the constructor's settings with no records; lets in-flight replies finish."""
        self.release()
        self.wait_until_finished(timeout)
        with self._lock:
            d = self._defaults
            self.reply, self.delay, self.tokens = d["reply"], d["delay"], d["tokens"]
            self.hold_after, self.script, self.fault = (
                d["hold_after"],
                list(d["script"]),
                d["fault"],
            )
            self.report_usage = self._report_usage
            self._records.clear()
            self._release.clear()
            self._held.clear()

    def release(self) -> None:
        """Let replies held by `hold_after` (or a `hang` fault) continue."""
        self._release.set()

    # Inspection ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """Every chat-completions request received so far, oldest first."""
        with self._lock:
            return [r for r in self._records if r.path.endswith("/chat/completions")]

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """Wait until at least `n` chat requests have arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected {n} requests, got {len(self.requests)}")
                self._lock.wait(left)
            return self.requests

    def wait_until_held(self, timeout: float = 10.0) -> Recorded:
        """Wait until a reply has reached `hold_after` tokens and is paused; return its request."""
        if not self._held.wait(timeout):
            raise TimeoutError("no reply reached the hold point")
        return self.requests[-1]

    def wait_until_finished(self, timeout: float = 10.0) -> None:
        """Wait until no request is still being answered."""
        deadline = time.monotonic() + timeout
        for record in self.requests:
            if not record._done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"request still in flight: {record.path}")

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should be."""
        return f"http://{self.host}:{self.port}/v1"

    # Lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FakeOpenAI:
        """Start serving in a background thread; returns once the port is bound."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._connection, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # report to the starting thread, then end
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("fake OpenAI server did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: drop open connections, stop the loop, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.release()

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=timeout)
            if self._server is not None:
                await self._server.wait_closed()

        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # HTTP ------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        # One request per connection (every answer says Connection: close): a disconnect watch
        # can then never swallow the bytes of a next request.
        task = asyncio.current_task()
        self._handlers.add(task)
        record = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_HEAD:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length") or 0)
            raw = await reader.readexactly(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"_invalid": raw.decode("utf-8", "replace")}
            path = target.split("?", 1)[0]
            record = Recorded(method=method, path=path, headers=headers, body=body)
            with self._lock:
                self._records.append(record)
                self._lock.notify_all()
            await self._answer(record, reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            if record is not None and not record.completed:
                record.disconnected = True
        except asyncio.CancelledError:
            if record is not None and not record.completed:
                record.disconnected = True
        finally:
            if record is not None:
                record.ended = time.monotonic()
                record._done.set()
                with self._lock:
                    self._lock.notify_all()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _answer(self, record: Recorded, reader, writer) -> None:
        if record.method == "GET" and record.path.endswith("/models"):
            data = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            await _send_json(writer, 200, data)
            record.completed = True
            return
        if record.method != "POST" or not record.path.endswith("/chat/completions"):
            await _send_json(writer, 404, _error("Not found", "not_found"))
            record.completed = True
            return
        side = self.side_reply(record.body) if self.side_reply else None
        with self._lock:
            if side is not None:
                fault, reply, delay, tokens, hold_after = None, side, 0.0, None, None
            else:
                fault = self.script.pop(0) if self.script else self.fault
                reply, delay, tokens = self.reply, self.delay, self.tokens
                hold_after = self.hold_after
        record.fault = fault
        if fault is not None and fault.kind == "http":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            await _send_json(writer, fault.status, _error(fault.message), headers)
            record.completed = True
            return
        text = reply(record.body) if callable(reply) else reply
        pieces = split_tokens(text)
        if tokens is not None:
            pieces = [p for p, _ in zip(itertools.cycle(pieces), range(tokens), strict=False)]
        watch = asyncio.ensure_future(reader.read(1))  # resolves (b"") when the client hangs up
        try:
            if fault is not None and fault.kind == "hang":
                await self._hold(watch, record)
                return
            if record.body.get("stream"):
                await self._stream(record, writer, pieces, delay, hold_after, fault, watch)
            else:
                await self._complete(record, writer, pieces, delay, hold_after, watch)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await watch

    async def _hold(self, watch: asyncio.Future, record: Recorded) -> bool:
        """Pause until released; False (and the record marked) if the client left meanwhile."""
        self._held.set()
        deadline = time.monotonic() + _HOLD_LIMIT
        while not self._release.is_set() and time.monotonic() < deadline:
            if watch.done():
                record.disconnected = True
                return False
            await asyncio.sleep(0.01)
        return True

    async def _stream(self, record, writer, pieces, delay, hold_after, fault, watch) -> None:
        body = record.body
        cid = f"chatcmpl-fake{next(self._ids)}"
        created = int(time.time())
        model = body.get("model") or self.model

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> bytes:
            choices = [] if delta is None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ]  # fmt: skip
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        if fault is not None and fault.kind == "empty":
            await _write_chunk(writer, b"")
            record.completed = True
            return
        await _write_chunk(writer, chunk({"role": "assistant", "content": ""}))
        finish = "stop"
        if fault is not None and fault.kind == "deltas":
            pieces, finish = [], fault.finish
            for delta in fault.chunks:
                await _write_chunk(writer, chunk(delta))
                record.tokens_sent += 1
        elif fault is not None and fault.kind == "endless":
            for piece in itertools.cycle(pieces):
                if watch.done():
                    record.disconnected = True
                    return
                await _write_chunk(writer, chunk({"content": piece}))
                record.tokens_sent += 1
                await asyncio.sleep(delay)  # at least yield, so a hang-up is noticed
        for i, piece in enumerate(pieces):
            if fault is not None and i == fault.after and fault.kind in ("cut", "malformed"):
                if fault.kind == "malformed":
                    await _write_chunk(writer, b"data: {this is not json\n\n")
                    await _write_chunk(writer, b"")
                    record.completed = True
                # A cut: close without the terminating chunk, as a dying upstream would.
                return
            if hold_after is not None and i == hold_after and not await self._hold(watch, record):
                return
            if delay:
                await asyncio.sleep(delay)
            if watch.done():
                record.disconnected = True
                return
            await _write_chunk(writer, chunk({"content": piece}))
            record.tokens_sent += 1
        if watch.done():
            record.disconnected = True
            return
        await _write_chunk(writer, chunk({}, finish))
        if self.report_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = _usage(body, max(len(pieces), record.tokens_sent))
            await _write_chunk(writer, chunk(None, usage=usage))
        await _write_chunk(writer, b"data: [DONE]\n\n")
        if self.done_linger:
            await asyncio.sleep(self.done_linger)
        await _write_chunk(writer, b"")
        record.completed = True

    async def _complete(self, record, writer, pieces, delay, hold_after, watch) -> None:
        for i in range(len(pieces)):
            if hold_after is not None and i == hold_after and not await self._hold(watch, record):
                return
            if delay:
                await asyncio.sleep(delay)
            if watch.done():
                record.disconnected = True
                return
        record.tokens_sent = len(pieces)
        data = {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.body.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }
        if self.report_usage:
            data["usage"] = _usage(record.body, len(pieces))
        await _send_json(writer, 200, data)
        record.completed = True


def _error(message: str, code: str = "fake_error") -> dict:
    return {"error": {"message": message, "type": "fake_error", "param": None, "code": code}}


def _usage(body: dict, completion_tokens: int) -> dict:
    prompt = sum(len(str(m.get("content") or "").split()) for m in body.get("messages") or [] if m)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


async def _send_json(writer, status: int, data: dict, headers: dict | None = None) -> None:
    payload = json.dumps(data).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + payload)
    await writer.drain()


async def _write_chunk(writer, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


def main(argv: list[str] | None = None) -> None:
    """Serve the fake until interrupted (for benchmarks and manual runs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument(
        "--reply", default="Lorem ipsum dolor sit amet, **consectetur** adipiscing."
    )
    parser.add_argument("--tokens", type=int, default=None, help="stream exactly this many tokens")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each token")
    args = parser.parse_args(argv)
    fake = FakeOpenAI(
        args.reply, delay=args.delay, tokens=args.tokens, host=args.host, port=args.port
    )
    with fake:
        print(f"fake OpenAI server: OPENAI_BASE_URL={fake.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
