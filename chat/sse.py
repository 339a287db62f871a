"""Server-sent events: framing, and a response that compresses the stream as it goes.

Each event is flushed on its own (Z_SYNC_FLUSH), so compression adds no latency, while the
compressor's window lets a re-rendered tail cost a few bytes of back-reference on the wire.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

_LINES = re.compile(r"\r\n|\r|\n")
STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and similar proxies must pass each event on at once.
    "X-Accel-Buffering": "no",
}


def event(name: str, data: str, *, id: str | None = None) -> str:
    """Frame one SSE event; multi-line data becomes several `data:` lines."""
    head = f"event: {name}\n" + (f"id: {id}\n" if id is not None else "")
    return head + "".join(f"data: {line}\n" for line in _LINES.split(data)) + "\n"


def comment(text: str = "ping") -> str:
    """An SSE comment, ignored by clients; keeps idle connections and proxies awake."""
    return f": {text}\n\n"


async def _gzip(chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
    # 16 + 12: gzip container with a 4 KB window and memLevel 5 (~35 KB per stream instead of
    # ~256 KB); a re-sent tail is well within 4 KB, so it still compresses to a back-reference.
    packer = zlib.compressobj(5, zlib.DEFLATED, 16 + 12, 5)
    async for chunk in chunks:
        yield packer.compress(chunk.encode()) + packer.flush(zlib.Z_SYNC_FLUSH)
    yield packer.flush()


async def _plain(chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk.encode()


def event_stream(chunks: AsyncIterator[str], *, accept_encoding: str = "") -> StreamingResponse:
    """A text/event-stream response, gzip-compressed when the client accepts it."""
    headers = dict(STREAM_HEADERS)
    if "gzip" in accept_encoding.lower():
        headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
        body = _gzip(chunks)
    else:
        body = _plain(chunks)
    return StreamingResponse(body, media_type="text/event-stream; charset=utf-8", headers=headers)
