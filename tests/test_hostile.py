"""A hostile or broken model endpoint, through the real provider path (the loopback fake OpenAI
server): text that is not valid Unicode, absurd tool arguments, duplicate tool-call ids, tool
input that overflows, and a stream that ignores max_tokens. Every reply ends, says what went
wrong where it was shown, is saved, and frees its slot; the conversation goes on."""

from __future__ import annotations

import json

import pytest

from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    HtmxClient,
    LiveApp,
    app_fixture,
    fake_fixture,
    fake_server_fixture,
    replies,
    running_app,
)

HUGE = json.dumps({"expression": "1+" * 500_000 + "1"})  # ~1 MB of arguments
DEEP = '{"expression": ' + "[" * 5000 + "]" * 5000 + "}"


def calls(*args: str, cid: str = "call_1") -> Fault:
    """A response calling the calculator once with these raw arguments."""
    return Fault.tool_calls(*((f"{cid}_{i}", "calculate", a) for i, a in enumerate(args)))


def assert_ended_cleanly(app: LiveApp, client: HtmxClient, sent, status: str) -> str:
    """The reply ended with `status`, nothing is left running or streaming, and the page shows
    it; returns the text of the reply's alert (or "")."""
    events = client.follow(sent.stream_url)
    assert events[-1].data == status, [e.data[:200] for e in events[-3:]]
    app.wait_idle()
    assert app.health()["runs"] == 0
    turn = app.turns()[-1]
    assert turn["status"] == status
    page = client.open(f"/c/{sent.cid}")
    reply = page.find_all(attrs={"data-role": "assistant"})[-1]
    alert = reply.find(attrs={"role": "alert"})
    assert "Traceback" not in page.get_text()
    return alert.get_text(" ", strip=True) if alert else ""


@pytest.mark.parametrize(
    ("script", "status", "says"),
    [
        # A lone surrogate arrives as a valid JSON escape, and breaks UTF-8 (SQLite, the page).
        (
            [Fault.deltas({"content": "Kept words. "}, {"content": "bad \ud800 text"})],
            "failed",
            "not valid Unicode",
        ),
        # A surrogate in tool-call arguments: the tool refuses it; the model tries again.
        ([calls('{"expression": "\\ud800"}'), None], "complete", ""),
        # Arguments that are not JSON, huge, deeply nested or of the wrong type, every time.
        ([calls('{"expression": ')] * 4, "failed", "could not be understood"),
        ([calls(HUGE)] * 4, "failed", "could not be understood"),
        ([calls(DEEP)] * 4, "failed", "could not be understood"),
        ([calls('{"expression": [1, {"a": null}]}')] * 4, "failed", "could not be understood"),
        # Input that overflows the calculator is refused to the model, which then answers.
        ([calls('{"expression": "' + "*".join(["999999**64"] * 12) + '"}'), None], "complete", ""),
        ([calls('{"expression": "1e6**64"}'), None], "complete", ""),
        ([calls('{"expression": "10**10**10"}'), None], "complete", ""),
    ],
    ids=[
        "surrogate-text",
        "surrogate-args",
        "invalid-json",
        "huge",
        "deep",
        "wrong-types",
        "huge-int",
        "float-overflow",
        "tower",
    ],
)
def test_a_hostile_model_reply_ends_cleanly_and_the_next_turn_works(
    app: LiveApp, fake: FakeOpenAI, script, status, says
):
    fake.configure("Recovered answer.", script=script)
    with HtmxClient(app.url) as client:
        sent = client.send("Compute something")
        alert = assert_ended_cleanly(app, client, sent, status)
        if says:
            assert says in alert
        else:
            assert alert == ""
        fake.configure("Next answer.", script=[])
        follow = client.send("And now?")
        assert client.follow(follow.stream_url)[-1].data == "complete"
    turns = app.turns()
    assert "Kept words." in turns[-2]["reply_text"] or says != "not valid Unicode"
    # What the model was sent next is valid: its history holds the first exchange.
    history = replies(fake)[-1].texts("user")
    assert "And now?" in history
    # The first exchange is in it, unless it alone is past the history budget (a megabyte of
    # arguments, four times): then the reply says it was left out.
    assert "Compute something" in history or turns[-1]["reply_text"].startswith(
        "*Earlier messages were left out"
    )


def test_duplicate_tool_call_ids_end_cleanly(app: LiveApp, fake: FakeOpenAI):
    twice = Fault.tool_calls(
        ("same", "calculate", '{"expression": "6*7"}'),
        ("same", "calculate", '{"expression": "2+2"}'),
    )
    fake.configure("Both done.", script=[twice, None])
    with HtmxClient(app.url) as client:
        sent = client.send("Two sums")
        events = client.follow(sent.stream_url)
        assert events[-1].data in ("complete", "failed")
        app.wait_idle()
        assert app.turns()[-1]["status"] == events[-1].data
        page = client.open(f"/c/{sent.cid}")
        if events[-1].data == "failed":
            alert = page.find_all(attrs={"data-role": "assistant"})[-1].find(
                attrs={"role": "alert"}
            )
            assert alert is not None and "Try again" in alert.get_text()
        fake.configure("Next.", script=[])
        follow = client.send("Next?")
        assert client.follow(follow.stream_url)[-1].data == "complete"


def test_max_tokens_reaches_the_model_and_an_endless_stream_is_cut_off(
    fake_server: FakeOpenAI, tmp_path
):
    fake_server.reset()
    fake_server.configure("word ", script=[Fault.endless()])
    env = {"OPENAI_BASE_URL": fake_server.base_url, "OPENAI_API_KEY": "t"}
    with running_app(tmp_path / "capped", MAX_OUTPUT_TOKENS="200", **env) as app:
        with HtmxClient(app.url) as client:
            sent = client.send("Never stop")
            events = client.follow(sent.stream_url)
            assert events[-1].data == "stopped"
            app.wait_idle()
            request = replies(fake_server)[0]
            sent_cap = request.body.get("max_completion_tokens") or request.body.get("max_tokens")
            assert sent_cap == 200
            fake_server.wait_until_finished()
            assert request.disconnected  # the app hung up on the upstream
            turn = app.turns()[-1]
            assert turn["status"] == "stopped"
            # Kept, and bounded: 200 tokens at most 6 characters each, plus the last read.
            assert 200 <= len(turn["reply_text"]) < 200 * 6 + 2000
            page = client.open(f"/c/{sent.cid}")
            alert = page.find(attrs={"data-role": "assistant"}).find(attrs={"role": "alert"})
            assert "longest reply this site allows" in alert.get_text()
            assert "word word" in page.find(attrs={"data-role": "assistant"}).get_text()
