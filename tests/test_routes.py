"""The HTTP contract, through the app as a browser (with htmx) uses it.

The test client reads a whole response before returning it, so a stream is read to its end.
Live streams are made deterministic by holding the model before its last step and releasing
it from the app's event loop once the stream is attached (`held` and `release_soon`).
"""

from __future__ import annotations

import asyncio
import html
import re

import pytest
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelResponse, TextPart
from starlette.testclient import TestClient

from chat.markdown import render
from tests.conftest import (
    Event,
    ModelBroke,
    Node,
    ScriptedModel,
    connect_db,
    parse_html,
    parse_sse,
    reply_texts,
    user_prompts,
)

HTMX = {"HX-Request": "true"}
CHUNKS = ["Hello ", "**there**", ".\n\n", "- one\n", "- two\n"]
REPLY = "".join(CHUNKS)


# How a browser talks to the app ----------------------------------------------------------


def send(client: TestClient, msg: str, cid: str = "", **headers):
    """POST the composer form the way htmx does."""
    return client.post("/send", data={"msg": msg, "cid": cid}, headers={**HTMX, **headers})


def reply_element(response) -> Node:
    return parse_html(response.text).find(data_role="assistant")


def stream_url(response) -> str:
    return reply_element(response).attrs["sse-connect"]


def stop_url(response) -> str:
    """Where the reply's Stop button posts."""
    buttons = reply_element(response).find_all("button")
    return next(b.attrs["hx-post"] for b in buttons if b.text.strip() == "Stop")


def conversation_url(response) -> str:
    return response.headers["HX-Push-Url"]


def open_stream(client: TestClient, url: str, **headers) -> list[Event]:
    """Everything the stream sends, to its end."""
    response = client.get(url, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


def replay(client: TestClient, url: str) -> list[Event]:
    """The stream of a reply, once it has ended: the first open waits for the end."""
    open_stream(client, url)
    return open_stream(client, url)


def chat(client: TestClient, msg: str, cid: str = "") -> tuple:
    """Send a message and wait for its reply: (send response, the reply's stream)."""
    response = send(client, msg, cid)
    assert response.status_code == 200, response.text
    return response, replay(client, stream_url(response))


def words(text: str) -> str:
    """Text with its whitespace folded, as a browser shows it."""
    return " ".join(text.split())


def shown_text(events: list[Event]) -> str:
    """The reply's text as the browser ends up showing it: every `blocks` event, in order."""
    return words(" ".join(parse_html(e.data).text for e in events if e.name == "blocks"))


def rendered_text(markdown: str) -> str:
    return words(parse_html(render(markdown)).text)


def rows(settings, sql: str) -> list[tuple]:
    """Read the app's SQLite file directly, as another process would."""
    conn = connect_db(settings)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# Driving a held model from the app's event loop -------------------------------------------


def wait(client: TestClient, event: asyncio.Event) -> None:
    """Block until `event` is set on the app's event loop (bounded)."""
    client.portal.call(asyncio.wait_for, event.wait(), 5)


def release(client: TestClient, model: ScriptedModel) -> None:
    """Let a held model go on (asyncio events are set on their own loop)."""
    client.portal.call(model.resume.set)


async def _release_later(model: ScriptedModel) -> None:
    await asyncio.sleep(0.05)
    model.resume.set()


def release_soon(client: TestClient, model: ScriptedModel) -> None:
    """Let a held model go on shortly: after a stream opened next has attached."""
    client.portal.start_task_soon(_release_later, model)


@pytest.fixture
def held(make_client, scripted):
    """Factory: a client whose model streams `chunks` and holds before finishing."""

    def make(chunks: list[str] = CHUNKS, **kw) -> tuple[TestClient, ScriptedModel]:
        model = scripted(chunks, pause_after=kw.pop("pause_after", len(chunks)), **kw)
        return make_client(model), model

    return make


# The page -------------------------------------------------------------------------------


def test_home_page_has_the_composer(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    doc = parse_html(response.text)
    textarea = doc.find("textarea", name="msg")
    form = next(f for f in doc.find_all("form") if textarea in list(f.walk()))
    assert form.attrs.get("hx-post") or form.attrs.get("action")
    labels = [lab for lab in doc.find_all("label") if lab.attrs.get("for") == textarea.attrs["id"]]
    assert [lab.text.strip() for lab in labels] == ["Message"]
    buttons = [b.text.strip() or b.attrs.get("aria-label") for b in form.find_all("button")]
    assert "Send" in buttons


def test_every_page_carries_the_same_head_without_copying_it(client):
    import copy

    from components.head import Head

    pages = [parse_html(client.get("/").text), parse_html(client.get("/").text)]
    wanted = [el.attrs.get("src") or el.attrs.get("href") for el in Head()]
    wanted = [w for w in wanted if w]
    assert len(wanted) >= 3  # our CSS and scripts
    for doc in pages:
        tags = doc.find_all("script") + doc.find_all("link")
        urls = [el.attrs.get("src") or el.attrs.get("href") for el in tags]
        assert all(w in urls for w in wanted)
    # FastHTML deep-copies the app's head into each request unless it says it need not (~0.2 ms
    # per request, held by every open stream's request).
    assert copy.deepcopy(client.app.hdrs) is client.app.hdrs


def test_health_answers_json(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["status"] == "ok"


def test_unknown_conversation_is_not_found(client):
    assert client.get("/c/does-not-exist").status_code == 404


# Sending --------------------------------------------------------------------------------


def test_send_answers_the_user_message_and_a_live_reply(client):
    response = send(client, "Hi <there> & welcome")
    assert response.status_code == 200
    doc = parse_html(response.text)
    user = doc.find(data_role="user")
    assert "Hi <there> & welcome" in user.text  # shown as typed, never interpreted
    assert "&lt;there&gt;" in response.text
    reply = doc.find(data_role="assistant")
    assert reply.attrs["hx-ext"] == "sse"
    assert reply.attrs["sse-connect"].startswith("/")
    assert reply.attrs["sse-close"]
    assert "Stop" in [b.text.strip() for b in reply.find_all("button")]


def test_first_message_pushes_the_conversation_url(client, settings):
    first, _ = chat(client, "First")
    url = first.headers["HX-Push-Url"]
    assert re.fullmatch(r"/c/[\w-]+", url)
    second = send(client, "Second", url.rsplit("/", 1)[1])
    assert second.status_code == 200
    assert "HX-Push-Url" not in second.headers
    assert rows(settings, "select count(distinct conversation_id), count(*) from turns") == [(1, 2)]


def test_plain_form_post_redirects_to_the_conversation(client):
    response = client.post("/send", data={"msg": "No JavaScript here"}, follow_redirects=False)
    assert response.status_code == 303
    url = response.headers["location"]
    assert re.fullmatch(r"/c/[\w-]+", url)
    page = client.get(url)
    assert page.status_code == 200
    assert "No JavaScript here" in parse_html(page.text).find(data_role="user").text


def test_empty_message_is_refused_and_nothing_is_stored(client, model, settings):
    for text in ("", "   \n\t "):
        response = send(client, text)
        assert response.status_code == 422
        assert parse_html(response.text).text.strip(), "the refusal says why"
    assert rows(settings, "select count(*) from turns") == [(0,)]
    assert rows(settings, "select count(*) from conversations") == [(0,)]
    assert model.calls == []


def test_too_long_message_is_refused_before_any_model_call(client, model, settings):
    limit = settings.max_message_chars
    response = send(client, "x" * (limit + 1))
    assert response.status_code == 413
    assert f"{limit:,}" in response.text
    assert rows(settings, "select count(*) from turns") == [(0,)]
    assert model.calls == []
    # Exactly at the limit is fine.
    assert send(client, "y" * limit).status_code == 200


def test_line_breaks_count_once_towards_the_limit(make_client, model, settings):
    client = make_client(model, max_message_chars=20)
    typed = "aaaa\nbbbb\ncccc\ndddd"  # 19 characters in the box (maxlength=20)
    assert len(typed) < 20
    # Browsers submit textarea line breaks as CRLF.
    assert send(client, typed.replace("\n", "\r\n")).status_code == 200
    assert rows(settings, "select user_text from turns") == [(typed,)]


def test_sending_while_a_reply_streams_is_refused(held, settings):
    client, model = held(["Busy"], pause_after=1)
    response = send(client, "First")
    wait(client, model.paused)
    refused = send(client, "Second", conversation_url(response).rsplit("/", 1)[1])
    assert refused.status_code == 409
    assert parse_html(refused.text).text.strip()
    assert rows(settings, "select user_text from turns") == [("First",)]
    release(client, model)
    assert replay(client, stream_url(response))[-1].data.strip() == "complete"
    assert len(model.calls) == 1


def test_message_is_stored_before_the_reply_is_written(held, settings):
    client, model = held(["Still ", "thinking"], pause_after=1)
    send(client, "Remember me")
    wait(client, model.paused)
    # The model is mid-reply; the message is already on disk.
    assert rows(settings, "select user_text, status from turns") == [("Remember me", "streaming")]


# Streaming ------------------------------------------------------------------------------


def test_live_stream_sends_the_reply_and_ends_with_the_close_event(held):
    client, model = held()
    response = send(client, "Hi")
    close = reply_element(response).attrs["sse-close"]
    wait(client, model.paused)
    release_soon(client, model)
    events = open_stream(client, stream_url(response))

    assert events[-1].name == close
    assert events[-1].data.strip()
    assert [e.name for e in events].count(close) == 1
    assert "tail" in [e.name for e in events]  # it was live, not a replay from storage
    assert shown_text(events) == rendered_text(REPLY)
    assert "<strong>there</strong>" in "".join(e.data for e in events if e.name == "blocks")


def test_reopening_the_stream_replays_the_same_reply(held):
    client, model = held(["Para one.\n\n", "Para ", "two."])
    response = send(client, "Hi")
    wait(client, model.paused)
    release_soon(client, model)
    live = open_stream(client, stream_url(response))
    again = open_stream(client, stream_url(response))
    assert shown_text(live) == shown_text(again) == "Para one. Para two."
    assert live[-1] == again[-1]


def test_a_stream_opened_midway_replays_then_follows(make_client, scripted):
    model = scripted(["Before the pause.\n\n", "After ", "it."], pause_after=2)
    client = make_client(model, stream_tick=0.0)  # every chunk is rendered at once
    response = send(client, "Hi")
    wait(client, model.paused)
    # The first block exists; the rest is written once the stream is attached.
    model.pause_after = None
    release_soon(client, model)
    events = open_stream(client, stream_url(response))
    assert events[0].name == "blocks" and "Before the pause." in events[0].data
    assert events[-1].data.strip()
    assert len(model.calls) == 1


def test_opening_the_stream_many_times_calls_the_model_once(make_client, scripted):
    model = scripted(["Only ", "once", "."], delay=0.002)
    client = make_client(model)
    response = send(client, "Hi")
    url = stream_url(response)
    # More times than one browser may hold streams open at once: each one gives its slot back.
    for _ in range(getattr(client.app.state.settings, "open_streams", 12) + 3):
        assert open_stream(client, url)[-1].data.strip()
    assert shown_text(open_stream(client, url)) == "Only once."
    assert len(model.calls) == 1


def test_gzip_and_plain_streams_carry_the_same_events(client):
    response, _ = chat(client, "Hi")
    url = stream_url(response)
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    zipped = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert parse_sse(zipped.text) == parse_sse(plain.text)  # httpx decompresses


def test_reloaded_page_shows_the_finished_reply(client):
    response, events = chat(client, "Hi")
    assert shown_text(events) == rendered_text(REPLY)
    page = parse_html(client.get(conversation_url(response)).text)
    assert "Hi" in page.find(data_role="user").text
    reply = page.find(data_role="assistant")
    assert "sse-connect" not in reply.attrs  # finished: nothing left to stream
    assert rendered_text(REPLY) in words(reply.text)


def test_a_shown_reply_is_rendered_once_and_kept_until_the_renderer_changes(client, settings):
    from chat.markdown import RENDER_VERSION

    response, _ = chat(client, "Hi")
    url = conversation_url(response)
    assert rows(settings, "select reply_html from turns") == [(None,)]  # not shown yet

    first = parse_html(client.get(url).text).find(data_role="assistant")
    [(cached, version)] = rows(settings, "select reply_html, reply_html_version from turns")
    assert cached == render(REPLY) and version == RENDER_VERSION

    # The cached HTML is what the page shows from then on...
    conn = connect_db(settings)
    with conn:
        conn.execute("update turns set reply_html = '<p>from the cache</p>'")
    shown = parse_html(client.get(url).text).find(data_role="assistant")
    assert "from the cache" in shown.text and words(first.text) != words(shown.text)

    # ...unless another renderer version wrote it: then the reply is rendered again.
    with conn:
        conn.execute("update turns set reply_html_version = ?", [RENDER_VERSION - 1])
    conn.close()
    again = parse_html(client.get(url).text).find(data_role="assistant")
    assert rendered_text(REPLY) in words(again.text) and "from the cache" not in again.text
    assert rows(settings, "select reply_html_version from turns") == [(RENDER_VERSION,)]


def test_history_sent_to_the_model_holds_the_earlier_turns(client, model):
    response, _ = chat(client, "My name is Ada.")
    chat(client, "What is my name?", conversation_url(response).rsplit("/", 1)[1])

    assert len(model.calls) == 2
    assert model.prompts[1] == ["My name is Ada.", "What is my name?"]
    assert "".join(reply_texts(model.calls[1])) == REPLY


def test_the_database_holds_pydantic_ai_messages(client, settings):
    response, _ = chat(client, "First")
    chat(client, "Second", conversation_url(response).rsplit("/", 1)[1])

    stored = rows(settings, "select user_text, status, messages from turns order by id")
    assert [(u, s) for u, s, _ in stored] == [("First", "complete"), ("Second", "complete")]
    history = []
    for _, _, raw in stored:
        history += ModelMessagesTypeAdapter.validate_json(raw)
    assert user_prompts(history) == ["First", "Second"]
    replies = [m for m in history if isinstance(m, ModelResponse)]
    texts = ["".join(p.content for p in m.parts if isinstance(p, TextPart)) for m in replies]
    assert texts == [REPLY, REPLY]


def test_page_opened_mid_reply_attaches_to_it_and_is_static_once_done(held):
    client, model = held(["Half ", "way"], pause_after=1)
    response = send(client, "Hi")
    wait(client, model.paused)
    page = parse_html(client.get(conversation_url(response)).text)
    live = page.find(data_role="assistant")
    assert live.attrs["sse-connect"] == stream_url(response)
    release(client, model)
    replay(client, stream_url(response))
    done = parse_html(client.get(conversation_url(response)).text).find(data_role="assistant")
    assert "sse-connect" not in done.attrs
    assert "Half way" in words(done.text)
    assert len(model.calls) == 1


def test_reconnecting_after_the_end_replaces_what_the_browser_holds(client):
    response, events = chat(client, "Hi")
    # A browser that already holds one block reconnects (EventSource sends Last-Event-ID).
    again = open_stream(client, stream_url(response), **{"Last-Event-ID": "1"})
    first = parse_html(again[0].data)
    swap = next(n for n in first.walk() if n.attrs.get("hx-swap-oob"))
    assert swap.attrs["id"].startswith("md-")
    assert words(swap.text) == rendered_text(REPLY)  # the whole reply, once
    assert again[-1] == events[-1]


def test_long_conversations_are_paged(make_client, model):
    client = make_client(model, history_page=2)
    response, _ = chat(client, "one")
    cid = conversation_url(response).rsplit("/", 1)[1]
    chat(client, "two", cid)
    chat(client, "three", cid)
    page = parse_html(client.get(conversation_url(response)).text)
    users = [words(u.find("p").text) for u in page.find_all(data_role="user")]
    assert users == ["two", "three"]
    earlier = next(a for a in page.find_all("a") if "earlier" in a.text.lower())
    older = parse_html(client.get(earlier.attrs["href"], headers=HTMX).text)
    assert [words(u.find("p").text) for u in older.find_all(data_role="user")] == ["one"]
    assert len(older.find_all(data_role="assistant")) == 1


# Stopping and failing -------------------------------------------------------------------


def test_stop_ends_the_reply_and_keeps_what_was_written(held, settings):
    client, model = held(["Partial ", "answer", " that never comes"], pause_after=2)
    response = send(client, "Go")
    wait(client, model.paused)

    stopped = client.post(stop_url(response), headers=HTMX)
    assert stopped.status_code in (200, 204)
    events = replay(client, stream_url(response))
    assert events[-1].data.strip() == "stopped"
    assert shown_text(events) == "Partial answer"
    assert rows(settings, "select status, reply_text from turns") == [("stopped", "Partial answer")]
    page = parse_html(client.get(conversation_url(response)).text)
    assert "Partial answer" in page.find(data_role="assistant").text
    assert len(model.calls) == 1


def test_a_failed_reply_shows_an_alert_and_keeps_the_message(make_client, scripted, settings):
    model = scripted(["Half "], error=ModelBroke("internal detail sk-test-123"))
    client = make_client(model)
    response, events = chat(client, "Please work")

    streamed = parse_html("".join(e.data for e in events))
    alert = streamed.find(role="alert")
    assert "try again" in alert.text.lower()
    assert "sk-test-123" not in alert.text and "Traceback" not in alert.text
    page = parse_html(client.get(conversation_url(response)).text)
    alert = page.find(data_role="assistant").find(role="alert")
    assert "try again" in alert.text.lower()
    assert "sk-test-123" not in alert.text
    assert "Please work" in page.find(data_role="user").text
    assert rows(settings, "select user_text, status from turns") == [("Please work", "failed")]


# Ownership ------------------------------------------------------------------------------


class TestOwnership:
    """A second browser (no cookie) on the same running app, while the owner's reply streams."""

    @pytest.fixture
    def model(self, scripted) -> ScriptedModel:
        return scripted(["Private ", "reply"], pause_after=1)

    @pytest.fixture
    def started(self, client, model) -> dict:
        response = send(client, "My secret")
        wait(client, model.paused)
        url = conversation_url(response)
        return {
            "url": url,
            "cid": url.rsplit("/", 1)[1],
            "stream": stream_url(response),
            "stop": stop_url(response),
        }

    def test_the_page_is_not_found(self, other_browser, started):
        page = other_browser.get(started["url"])
        assert page.status_code == 404
        assert "My secret" not in page.text
        assert "My secret" not in other_browser.get("/").text

    def test_not_yours_looks_exactly_like_missing(self, other_browser, started):
        yours = other_browser.get(started["url"])
        missing = other_browser.get("/c/" + "x" * len(started["cid"]))
        assert (yours.status_code, yours.text) == (missing.status_code, missing.text)

    def test_the_stream_is_not_found(self, other_browser, started):
        response = other_browser.get(started["stream"])
        assert response.status_code == 404
        assert "Private" not in response.text

    def test_stop_is_not_found_and_the_reply_goes_on(self, client, other_browser, model, started):
        assert other_browser.post(started["stop"], headers=HTMX).status_code == 404
        release(client, model)
        events = replay(client, started["stream"])
        assert events[-1].data.strip() == "complete"
        assert shown_text(events) == "Private reply"

    def test_sending_into_it_is_not_found(self, other_browser, model, started, settings):
        assert send(other_browser, "Intruding", started["cid"]).status_code == 404
        assert rows(settings, "select user_text from turns") == [("My secret",)]
        assert len(model.calls) == 1

    def test_the_owner_still_sees_it(self, client, started):
        page = client.get(started["url"])
        assert page.status_code == 200
        assert "My secret" in parse_html(page.text).find(data_role="user").text


# Untrusted model output -----------------------------------------------------------------

XSS = [
    "Look: <script>alert('s')</script>\n\n",
    "<img src=x onerror=alert('i')>\n\n",
    "[click me](javascript:alert('j')) and [ok](https://example.com)\n\n",
    '<div hx-get="/health" hx-trigger="load">x</div>\n\n',
    "![pic](https://evil.example/p.png)",
]


def assert_safe(container: Node) -> None:
    """Nothing inside `container` can run script, load from elsewhere or drive htmx."""
    for node in container.walk():
        assert node.tag not in {"script", "img", "iframe", "object", "embed", "style"}, node.tag
        for name, value in node.attrs.items():
            assert not name.startswith("on"), (node.tag, name)
            assert not name.startswith(("hx-", "data-hx-", "sse-")) or name == "hx-disable", name
            assert name != "style"
            if name in ("href", "src", "action"):
                cleaned = re.sub(r"[\x00-\x20]", "", html.unescape(value or "")).lower()
                assert not cleaned.startswith(("javascript:", "data:", "vbscript:")), value


def model_html(doc: Node) -> list[Node]:
    """The containers that hold model-written HTML."""
    return [n for n in doc.walk() if "chunk" in (n.attrs.get("class") or "").split()]


def test_model_output_is_neutralised_live_and_after_reload(held):
    client, model = held(XSS)
    response = send(client, "Show me some HTML")
    wait(client, model.paused)
    release_soon(client, model)
    live = open_stream(client, stream_url(response))

    body = "".join(e.data for e in live)
    assert "<script" not in body.lower()
    containers = model_html(parse_html(body))
    assert containers
    for container in containers:
        assert "hx-disable" in container.attrs
        assert_safe(container)
    assert "<script>alert('s')</script>" in shown_text(live)  # shown as text

    page = parse_html(client.get(conversation_url(response)).text)
    reply = page.find(data_role="assistant")
    assert not reply.find_all("script")
    stored = model_html(reply)
    assert stored
    for container in stored:
        assert "hx-disable" in container.attrs
        assert_safe(container)
    links = [a.attrs.get("href") for c in stored for a in c.find_all("a")]
    assert "https://example.com" in links
    assert "<img src=x onerror=alert('i')>" in words(reply.text)


def test_user_text_is_escaped_everywhere(client):
    response, _ = chat(client, "<script>alert(1)</script><img src=x onerror=alert(2)>")
    for text in (response.text, client.get(conversation_url(response)).text):
        user = parse_html(text).find(data_role="user")
        assert not user.find_all("script") and not user.find_all("img")
        assert "<script>alert(1)</script>" in user.text


def test_a_title_written_by_the_model_is_escaped(make_client, scripted):
    model = scripted(["Sure."], side_reply="<img src=x onerror=alert(1)>Trip <b>plan</b>")
    client = make_client(model)
    response, events = chat(client, "Plan a trip")
    # After the first exchange the page fetches the title the model writes (hx-trigger=load).
    end = parse_html("".join(e.data for e in events if e.name == "end"))
    refresh = next(n for n in end.walk() if n.attrs.get("hx-trigger") == "load")
    client.get(refresh.attrs["hx-get"], headers=HTMX)
    page = client.get(conversation_url(response)).text
    doc = parse_html(page)
    assert doc.find("title").text.startswith("<img src=x onerror=alert(1)>Trip <b>plan</b>")
    assert not doc.find_all("img") and not doc.find_all("b")
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


# HTTP hardening -------------------------------------------------------------------------


def csp_directives(value: str) -> dict[str, list[str]]:
    out = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            out[words[0]] = words[1:]
    return out


@pytest.mark.parametrize("path", ["/", "/health", "/static/app.css", "/c/nope"])
def test_security_headers_everywhere(client, path):
    response = client.get(path)
    csp = csp_directives(response.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    script = csp.get("script-src", csp["default-src"])
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script
    assert "*" not in script
    assert csp["frame-ancestors"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_security_headers_on_the_stream(client):
    response, _ = chat(client, "Hi")
    streamed = client.get(stream_url(response))
    assert "default-src 'self'" in streamed.headers["content-security-policy"]
    assert streamed.headers["x-content-type-options"] == "nosniff"


def test_pages_have_no_inline_script_or_handlers(client):
    response, _ = chat(client, "Hi")
    for text in (client.get("/").text, client.get(conversation_url(response)).text):
        doc = parse_html(text)
        for script in doc.find_all("script"):
            assert script.attrs.get("src", "").startswith("/static/"), script.attrs
            assert not script.text.strip()
        assert not doc.find_all("style")
        for node in doc.walk():
            assert not any(name.startswith("on") for name in node.attrs), node.attrs


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://testserver"},
    ],
)
def test_cross_site_posts_are_refused(client, model, settings, headers):
    response = send(client, "Forged", **headers)
    assert response.status_code == 403
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert rows(settings, "select count(*) from turns") == [(0,)]
    assert model.calls == []


def test_same_origin_posts_are_accepted(client):
    headers = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert send(client, "Mine", **headers).status_code == 200


def test_cross_site_stop_is_refused(held):
    client, model = held(["Keep ", "going"], pause_after=1)
    response = send(client, "Hi")
    wait(client, model.paused)
    forged = client.post(stop_url(response), headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403
    release(client, model)
    assert replay(client, stream_url(response))[-1].data.strip() == "complete"


def test_session_cookie_is_http_only_and_same_site(client):
    cookie = client.get("/").headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie or "samesite=strict" in cookie


def test_not_found_page_is_one_well_formed_document(client):
    response = client.get("/c/nope")
    assert response.status_code == 404
    assert response.text.lower().count("<!doctype") == 1


# Issue 15: copy as Markdown, message times, the composer's limit ---------------------------


def test_a_replys_markdown_is_served_to_its_owner_only(client, other_browser):
    response, _ = chat(client, "Hi")
    page = parse_html(client.get(conversation_url(response)).text)
    buttons = page.find(data_role="assistant").find_all("button")
    (url,) = [b.attrs["data-copy-url"] for b in buttons if "data-copy-url" in b.attrs]
    source = client.get(url)
    assert source.status_code == 200
    assert source.text == REPLY  # the Markdown as written, not the rendered text
    assert source.headers["content-type"].startswith("text/markdown")
    assert source.headers["cache-control"] == "no-store"
    # Someone else's reply, an unknown turn and a turn under another conversation: all 404.
    assert other_browser.get(url).status_code == 404
    assert client.get(re.sub(r"/turns/\d+/", "/turns/999/", url)).status_code == 404
    other, _ = chat(client, "Another conversation")
    elsewhere = conversation_url(other).rsplit("/", 1)[1]
    assert client.get(re.sub(r"/c/[\w-]+/", f"/c/{elsewhere}/", url)).status_code == 404


def test_messages_carry_the_times_stored_with_their_turn(client, settings):
    response, _ = chat(client, "When?")
    page = parse_html(client.get(conversation_url(response)).text)
    ((created, finished),) = rows(settings, "select created_at, finished_at from turns")
    assert page.find(data_role="user").find("time").attrs["datetime"] == created
    assert page.find(data_role="assistant").find("time").attrs["datetime"] == finished


def test_the_message_box_does_not_cut_a_long_paste(make_client, model):
    client = make_client(model, max_message_chars=1234)
    box = parse_html(client.get("/").text).find("textarea", id="msg")
    assert "maxlength" not in box.attrs  # a browser would cut a paste without a word
    assert box.attrs["data-max-chars"] == "1234"  # app.js counts and explains instead
