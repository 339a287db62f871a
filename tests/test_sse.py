"""Server-sent events: framing, and the gzip-compressed stream."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import pytest

from chat import sse
from tests.conftest import Event, parse_sse


def test_single_line_event():
    assert sse.event("tail", "<p>hi</p>") == "event: tail\ndata: <p>hi</p>\n\n"


def test_event_with_id():
    assert sse.event("blocks", "x", id="3") == "event: blocks\nid: 3\ndata: x\n\n"


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_multi_line_data_becomes_several_data_lines(newline):
    data = newline.join(["<ul>", "<li>a</li>", "", "</ul>"])
    framed = sse.event("blocks", data)
    assert framed == "event: blocks\ndata: <ul>\ndata: <li>a</li>\ndata: \ndata: </ul>\n\n"
    # A browser joins the data lines with "\n": the HTML arrives intact.
    assert parse_sse(framed) == [Event("blocks", "<ul>\n<li>a</li>\n\n</ul>")]


def test_data_cannot_inject_fields_or_end_the_event_early():
    hostile = "a\n\nevent: done\ndata: stolen\nid: 99\n\nb"
    events = parse_sse(sse.event("tail", hostile))
    assert events == [Event("tail", hostile)]


def test_comment_is_ignored_by_clients():
    assert sse.comment() == ": ping\n\n"
    assert parse_sse(sse.comment() + sse.event("a", "1")) == [Event("a", "1")]


def test_events_concatenate_into_a_stream():
    body = (
        sse.event("blocks", "<p>1</p>\n", id="1") + sse.event("end", "x") + sse.event("done", "ok")
    )
    events = parse_sse(body)
    assert [(e.name, e.data, e.id) for e in events] == [
        ("blocks", "<p>1</p>\n", "1"),
        ("end", "x", None),
        ("done", "ok", None),
    ]


EVENTS = [
    sse.event("blocks", "<p>Hello <strong>there</strong></p>\n<ul>\n<li>é ✓</li>\n</ul>", id="1"),
    sse.comment(),
    *(sse.event("tail", "<p>" + "word " * i + "</p>") for i in range(40)),
    sse.event("end", "<span>model</span>"),
    sse.event("done", "complete"),
]


async def source(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


async def body_of(response) -> list[bytes]:
    return [chunk async for chunk in response.body_iterator]


async def test_plain_stream_sends_each_event_as_is():
    response = sse.event_stream(source(EVENTS))
    assert response.media_type.startswith("text/event-stream")
    assert "content-encoding" not in response.headers
    assert response.headers["cache-control"] == "no-cache"
    chunks = await body_of(response)
    assert [c.decode() for c in chunks] == EVENTS


async def test_gzip_stream_decompresses_to_the_same_events():
    response = sse.event_stream(source(EVENTS), accept_encoding="gzip, deflate, br")
    assert response.headers["content-encoding"] == "gzip"
    assert "accept-encoding" in response.headers["vary"].lower()
    chunks = await body_of(response)
    whole = zlib.decompress(b"".join(chunks), 31).decode()
    assert whole == "".join(EVENTS)
    assert parse_sse(whole) == parse_sse("".join(EVENTS))


async def test_gzip_stream_flushes_every_event_at_once():
    # Each event must be readable as soon as its chunk arrives, not when the stream ends.
    chunks = await body_of(sse.event_stream(source(EVENTS), accept_encoding="gzip"))
    reader = zlib.decompressobj(31)
    for event, chunk in zip(EVENTS, chunks, strict=False):
        assert reader.decompress(chunk).decode() == event
    assert len(chunks) == len(EVENTS) + 1  # and a last chunk that closes the gzip member
    assert reader.decompress(chunks[-1]) == b""
    assert reader.eof


async def test_gzip_stream_compresses_repeated_tails():
    chunks = await body_of(sse.event_stream(source(EVENTS), accept_encoding="gzip"))
    assert sum(map(len, chunks)) < len("".join(EVENTS).encode()) / 3


async def test_gzip_stream_is_one_valid_member_whatever_its_length():
    # Events far longer than the history each event may refer to, and an empty stream: both are
    # single gzip members whose trailer (CRC and length) the reader checks.
    big = [sse.event("tail", "<p>" + f"word{i} " * 900 + "</p>") for i in range(3)]
    for events in (big, []):
        body = b"".join(await body_of(sse.event_stream(source(events), accept_encoding="gzip")))
        reader = zlib.decompressobj(31)
        assert reader.decompress(body).decode() == "".join(events)
        assert reader.eof and reader.unused_data == b""
        assert gzip.decompress(body).decode() == "".join(events)


async def test_gzip_is_chosen_case_insensitively_and_only_when_accepted():
    assert sse.event_stream(source([]), accept_encoding="GZIP").headers["content-encoding"]
    assert "content-encoding" not in sse.event_stream(source([]), accept_encoding="br").headers


def test_live_markup_is_the_component_markup():
    from fastcore.xml import to_xml

    from components.messages import SafeHTML, safe_html_markup, tail_markup

    html = "<p>a &amp; <code>b</code></p>"
    assert safe_html_markup(html) == to_xml(SafeHTML(html))
    assert tail_markup(html).startswith(to_xml(SafeHTML(html)))
    assert tail_markup(html).endswith('<span aria-hidden="true" class="cursor"></span>')
    assert tail_markup("") == '<span aria-hidden="true" class="cursor"></span>'
