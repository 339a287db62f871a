"""End to end: `python main.py` under uvicorn, the real `openai-chat:` provider, a fake upstream.

Each test talks to the app as htmx does (HX-Request, form fields, the session cookie) and reads
the reply's SSE stream to its close event, then checks what reached the model and the database.
"""

from __future__ import annotations

import json
import time
import zlib

import httpx
import pytest
from pydantic_ai.messages import (
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
)

from chat.agent import INSTRUCTIONS
from chat.personas import load_personas
from tests.conftest import reply_texts, user_prompts
from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    TITLE,
    HtmxClient,
    LiveApp,
    app_fixture,
    check_resume_after_drop,
    demo_app_fixture,
    fake_fixture,
    fake_server_fixture,
    replies,
    reply_html,
    running_app,
    text_of,
)

REPLY = "Hello **bold** world.\n\n- first item\n- second item\n\nThe end."
REPLY_TEXT = "Hello bold world. first item second item The end."


@pytest.fixture
def visitor(app: LiveApp):
    """A new browser-less visitor (own cookie jar: own identity)."""
    with HtmxClient(app.url) as c:
        yield c


def test_message_streams_reply_from_the_real_provider(visitor: HtmxClient, fake: FakeOpenAI):
    fake.configure(REPLY, delay=0.005)
    page = visitor.open("/")
    assert page.find("textarea", attrs={"name": "msg"}) is not None

    sent = visitor.send("What is in the box?")

    assert "What is in the box?" in sent.text("user")
    assert sent.close_event == "done"
    assert sent.response.headers["HX-Push-Url"] == f"/c/{sent.cid}"
    events = visitor.follow(sent.stream_url, sent.close_event)
    names = [e.name for e in events]
    assert names[-2:] == ["end", "done"]
    assert events[-1].data == "complete"
    assert text_of(reply_html(events)) == REPLY_TEXT
    assert "<strong>bold</strong>" in reply_html(events)
    fake.wait_until_finished()  # the fake marks a reply complete after its last write
    [request] = replies(fake)
    assert request.body["model"] == "fake-model"
    assert request.body["stream"] is True
    assert request.texts("user") == ["What is in the box?"]
    assert request.completed and not request.disconnected


def test_second_message_sends_the_first_turn_as_history(visitor: HtmxClient, fake: FakeOpenAI):
    fake.configure(lambda body: f"Reply number {len(replies(fake))}.")
    first = visitor.send("First question")
    assert text_of(reply_html(visitor.follow(first.stream_url))) == "Reply number 1."

    second = visitor.send("Second question")
    assert second.cid == first.cid
    events = visitor.follow(second.stream_url)

    assert text_of(reply_html(events)) == "Reply number 2."
    one, two = replies(fake)
    assert one.texts("user") == ["First question"]
    assert two.texts("user") == ["First question", "Second question"]
    assert two.texts("assistant") == ["Reply number 1."]
    # The instructions (the base ones and the default persona's) go with every request, once
    # each: the stored history does not repeat them.
    system = "\n".join(two.texts("system"))
    assert system.count(INSTRUCTIONS) == 1
    persona = next(iter(load_personas().values())).instructions
    assert system.count(persona) == 1


def test_reopening_a_finished_stream_never_calls_the_model_again(
    visitor: HtmxClient, fake: FakeOpenAI, app: LiveApp
):
    fake.configure(REPLY)
    sent = visitor.send("Only once, please")
    first = visitor.follow(sent.stream_url)

    again = visitor.follow(sent.stream_url)
    resumed = visitor.follow(sent.stream_url, headers={"Last-Event-ID": "1"})

    assert text_of(reply_html(again)) == REPLY_TEXT
    assert text_of(reply_html(resumed)) == REPLY_TEXT
    assert again[-1].data == resumed[-1].data == first[-1].data == "complete"
    # A reopened stream that started a run would be running now: wait for the app to be idle.
    app.wait_idle()
    fake.wait_until_finished()
    assert len(replies(fake)) == 1
    assert all(r.completed for r in replies(fake))


def test_reopening_a_running_stream_replays_then_follows(visitor: HtmxClient, fake: FakeOpenAI):
    fake.configure("one two three four five six", hold_after=3)
    sent = visitor.send("Count to six")
    fake.wait_until_held()
    visitor.wait_for_text(sent.stream_url, "one two three")
    # That stream is gone; a new one replays what exists so far, then follows to the end.
    with visitor.events(sent.stream_url) as events:
        first = next(events)
        assert first.name in ("blocks", "tail")
        assert "one two three" in text_of(first.data)
        assert "four" not in text_of(first.data)
        fake.release()
        rest = [first]
        for ev in events:
            rest.append(ev)
            if ev.name == "done":
                break
    assert rest[-1].data == "complete"
    assert text_of(reply_html(rest)) == "one two three four five six"
    assert len(replies(fake)) == 1


def test_history_is_stored_as_pydantic_ai_messages(
    visitor: HtmxClient, fake: FakeOpenAI, app: LiveApp
):
    fake.configure(lambda body: f"Answer to {body['messages'][-1]['content']}")
    visitor.follow(visitor.send("alpha").stream_url)
    visitor.follow(visitor.send("beta").stream_url)

    rows = [t for t in app.turns() if t["conversation_id"] == visitor.cid]
    assert [r["user_text"] for r in rows] == ["alpha", "beta"]
    assert [r["status"] for r in rows] == ["complete", "complete"]
    assert [r["reply_text"] for r in rows] == ["Answer to alpha", "Answer to beta"]
    history = []
    for row in rows:
        history += ModelMessagesTypeAdapter.validate_json(row["messages"])
        assert json.loads(row["usage"])["output_tokens"] > 0
    assert [type(m) for m in history] == [ModelRequest, ModelResponse] * 2
    assert user_prompts(history) == ["alpha", "beta"]
    assert reply_texts(history) == ["Answer to alpha", "Answer to beta"]
    assert rows[1]["parent_id"] == rows[0]["id"]


def test_conversation_gets_a_title_from_the_model(visitor: HtmxClient, fake: FakeOpenAI):
    fake.configure("Sure.")
    visitor.follow(visitor.send("Please name this chat").stream_url)
    deadline = time.monotonic() + 10
    while TITLE not in visitor.open(f"/c/{visitor.cid}").find(id="chat-title").get_text():
        assert time.monotonic() < deadline, "the title never changed"
        time.sleep(0.1)
    titles = [r for r in fake.requests if r not in replies(fake)]
    assert len(titles) == 1
    assert "Please name this chat" in titles[0].texts("user")[0]


def test_upstream_error_ends_the_reply_with_an_alert_and_keeps_the_message(
    visitor: HtmxClient, fake: FakeOpenAI, app: LiveApp
):
    fake.configure(fault=Fault.http(500))
    sent = visitor.send("Will this fail?")
    events = visitor.follow(sent.stream_url)

    assert events[-1].data == "failed"
    end = next(e for e in events if e.name == "end")
    assert 'role="alert"' in end.data
    assert "HTTP 500" in text_of(end.data)
    assert all(r.fault == Fault.http(500) for r in replies(fake))
    page = visitor.open(f"/c/{sent.cid}")
    assert page.find(attrs={"data-role": "user"}).get_text(strip=True).startswith("Will this fail?")
    alert = page.find(attrs={"data-role": "assistant"}).find(attrs={"role": "alert"})
    assert alert is not None and "HTTP 500" in alert.get_text()
    [row] = [t for t in app.turns() if t["conversation_id"] == sent.cid]
    assert (row["user_text"], row["status"]) == ("Will this fail?", "failed")
    ModelMessagesTypeAdapter.validate_json(row["messages"])


def test_rate_limit_with_retry_after_is_retried_and_the_reply_arrives(
    visitor: HtmxClient, fake: FakeOpenAI
):
    fake.configure("Worth the wait.", script=[Fault.http(429, retry_after=0)])
    events = visitor.follow(visitor.send("Busy?").stream_url)

    assert events[-1].data == "complete"
    assert text_of(reply_html(events)) == "Worth the wait."
    fake.wait_until_finished()
    limited, ok = replies(fake)
    assert limited.fault.status == 429 and ok.fault is None and ok.completed


def test_connection_cut_mid_reply_keeps_the_partial_reply_with_an_alert(
    visitor: HtmxClient, fake: FakeOpenAI, app: LiveApp
):
    fake.configure("alpha beta gamma delta epsilon", script=[Fault.cut(after=3)])
    sent = visitor.send("Tell me five words")
    events = visitor.follow(sent.stream_url)

    assert events[-1].data == "failed"
    assert text_of(reply_html(events)) == "alpha beta gamma"
    assert 'role="alert"' in next(e for e in events if e.name == "end").data
    [row] = [t for t in app.turns() if t["conversation_id"] == sent.cid]
    assert row["status"] == "failed"
    assert row["reply_text"].strip() == "alpha beta gamma"
    assert len(replies(fake)) == 1


def test_malformed_chunk_fails_the_reply_with_an_alert(visitor: HtmxClient, fake: FakeOpenAI):
    fake.configure("one two three", script=[Fault.malformed(after=1)])
    events = visitor.follow(visitor.send("Say something odd").stream_url)

    assert events[-1].data == "failed"
    end = next(e for e in events if e.name == "end")
    assert 'role="alert"' in end.data
    assert "Try again" in text_of(end.data)
    assert "Traceback" not in end.data and "JSON" not in end.data


def test_stop_ends_the_upstream_call_and_keeps_the_partial_reply(
    visitor: HtmxClient, fake: FakeOpenAI, app: LiveApp
):
    fake.configure("one two three four five", hold_after=2)
    sent = visitor.send("Start and stop")
    held = fake.wait_until_held()
    visitor.wait_for_text(sent.stream_url, "one two")
    stop_url = sent.soup.find("button", string="Stop")["hx-post"]
    r = visitor.http.post(stop_url, headers={"HX-Request": "true", "Origin": visitor.base_url})
    assert r.status_code in (200, 204)

    events = visitor.follow(sent.stream_url)
    assert events[-1].data == "stopped"
    assert text_of(reply_html(events)) == "one two"
    fake.wait_until_finished()
    assert held.disconnected and not held.completed
    [row] = [t for t in app.turns() if t["conversation_id"] == sent.cid]
    assert (row["status"], row["reply_text"].strip()) == ("stopped", "one two")


def test_stream_is_gzipped_event_by_event_when_accepted(visitor: HtmxClient, fake: FakeOpenAI):
    fake.configure("zipped reply here " * 20, hold_after=5)
    sent = visitor.send("Compress this")
    fake.wait_until_held()
    url = visitor.base_url + sent.stream_url
    with visitor.http.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["content-type"].startswith("text/event-stream")
        unzip = zlib.decompressobj(31)
        text = ""
        raw = r.iter_raw()
        # Each event is flushed on its own: what was generated so far decodes before the end.
        while "zipped reply here" not in text:
            text += unzip.decompress(next(raw)).decode()
        fake.release()
        for chunk in raw:
            text += unzip.decompress(chunk).decode()
            if "event: done" in text:
                break
        text += unzip.flush().decode()
    assert "event: done\ndata: complete" in text
    assert text_of(text).count("zipped reply here") >= 20


def test_conversation_and_stream_are_private_to_their_owner(
    visitor: HtmxClient, fake: FakeOpenAI, app: LiveApp
):
    fake.configure("For your eyes only.")
    sent = visitor.send("My secret")
    visitor.follow(sent.stream_url)
    with httpx.Client(base_url=app.url, trust_env=False, timeout=10) as stranger:
        assert stranger.get(f"/c/{sent.cid}").status_code == 404
        assert stranger.get(sent.stream_url).status_code == 404
        assert "My secret" not in stranger.get(f"/c/{sent.cid}").text
    assert len(replies(fake)) == 1


def test_empty_message_is_refused_without_a_model_call(visitor: HtmxClient, fake: FakeOpenAI):
    r = visitor.send("   ", expect=422)
    assert "Type a message" in text_of(r.text)
    assert fake.requests == []


def test_demo_model_streams_configuration_help_and_echoes_the_message(demo_app: LiveApp):
    with HtmxClient(demo_app.url) as client:
        page = client.open("/")
        assert "demo" in page.find(class_="badge").get_text().lower()
        sent = client.send("Echo this: 42 penguins")
        events = client.follow(sent.stream_url)
        html = reply_html(events)

        assert events[-1].data == "complete"
        assert "<code>MODEL</code>" in html
        assert "Echo this: 42 penguins" in text_of(html)
        assert "openai-chat:" in text_of(html)
        page = client.open(f"/c/{sent.cid}")
        assert "Echo this: 42 penguins" in page.find(attrs={"data-role": "assistant"}).get_text()


def test_reply_in_flight_when_the_server_stops_is_kept_and_marked_interrupted(
    fake: FakeOpenAI, tmp_path
):
    fake.configure("one two three four five", hold_after=2)
    workdir = tmp_path / "restart"
    # The held reply outlasts the stop's drain (a second here, not the default 25 s).
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "test", "DRAIN_GRACE": "1"}
    with running_app(workdir, **env) as first, HtmxClient(first.url) as client:
        sent = client.send("Keep this across a restart")
        held = fake.wait_until_held()
        client.wait_for_text(sent.stream_url, "one two")
        first.stop()  # SIGTERM, as a deployment would
        cookies = client.http.cookies
    assert held.finished and held.disconnected
    with running_app(workdir, **env) as second, HtmxClient(second.url) as client:
        client.http.cookies = cookies  # the same browser comes back
        page = client.open(f"/c/{sent.cid}")
        user = page.find(attrs={"data-role": "user"}).get_text(" ")
        reply = page.find(attrs={"data-role": "assistant"}).get_text(" ")
        events = client.follow(sent.stream_url)
    assert "Keep this across a restart" in user
    assert "one two" in reply
    # The user did not press Stop: the reply must not say so.
    assert "you stopped it" not in reply
    assert "interrupted" in reply.lower()
    assert events[-1].data == "interrupted"
    assert len(replies(fake)) == 1


def test_reconnect_with_last_event_id_resumes_without_repeating(
    visitor: HtmxClient, fake: FakeOpenAI
):
    text = "First paragraph.\n\nSecond paragraph.\n\nThird paragraph.\n\nFourth paragraph."
    check_resume_after_drop(visitor, visitor, fake, text, "Four paragraphs")
