"""Server-sent events: framing, and a response that compresses the stream as it goes.

Each event is flushed on its own (Z_SYNC_FLUSH), so compression adds no latency, while
back-references to the events before it let a re-rendered tail cost a few bytes on the wire.
"""

from __future__ import annotations

import re
import struct
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


# A gzip member header: deflate, no name, no time, unknown OS (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# How much of what was sent each event may refer back to (a re-rendered tail is well within it),
# and the matching raw-deflate window (2**12 = 4 KB): small windows also start fastest (~10 us).
_HISTORY = 4096
_WBITS, _MEM_LEVEL = -12, 5
# The deflate stream's last block (empty, marked final): the same bytes for every stream.
_LAST_BLOCK = zlib.compressobj(5, zlib.DEFLATED, _WBITS, _MEM_LEVEL).flush()


def _deflate(data: bytes, history: bytes) -> bytes:
    """`data` as raw deflate blocks that may refer back into `history`, ended by a sync flush."""
    extra = {"zdict": history} if history else {}
    packer = zlib.compressobj(5, zlib.DEFLATED, _WBITS, _MEM_LEVEL, **extra)
    return packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH)


async def _gzip(chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """One gzip member, written event by event, holding no compressor between events.

    A compressor is ~30-250 KB, and an open stream mostly waits for the model. So each event is
    compressed by a fresh raw-deflate compressor primed with the last few KB sent (as pigz does
    for parallel blocks): its back-references land in the reader's window, which holds exactly
    those bytes, and the sync flush ends it on a byte boundary where the next event's blocks can
    follow. What a stream keeps between events is those few KB, a CRC and a length.
    """
    crc, size, history = 0, 0, b""
    head = _GZIP_HEADER  # goes out with the first chunk, whichever that is
    async for chunk in chunks:
        data = chunk.encode()
        yield head + _deflate(data, history)
        head = b""
        crc, size = zlib.crc32(data, crc), size + len(data)
        history = (history + data)[-_HISTORY:]
    # The last block, then the trailer: CRC-32 and length of everything sent.
    yield head + _LAST_BLOCK + struct.pack("<II", crc, size & 0xFFFFFFFF)


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
