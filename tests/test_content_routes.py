"""What the chat shows and keeps, route by route: feedback, comparisons, deleting the open
conversation, regenerate, search, sidebar groups, the demo model's first reply, error words."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelRequest, UserPromptPart

from chat.agent import TRY_PHRASES, ModelUnavailable, demo_reply, demo_tool_call, resolve_model
from chat.errors import OUTPUT_LIMIT, describe_error
from chat.tools import toolset
from components.sidebar import Sidebar, group_label
from tests.conftest import HX, connect_db, parse_html, send, stream

pytestmark = pytest.mark.filterwarnings("error")


def rows(settings, sql: str, args=()) -> list[tuple]:
    conn = connect_db(settings)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def chat(client, msg: str, **data) -> tuple[str, str]:
    """Send `msg` and wait for its reply; (conversation id, answer HTML)."""
    r = send(client, msg, **data)
    stream(client, r.text)
    cid = data.get("cid") or r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    return cid, r.text


def page(client, cid: str):
    r = client.get(f"/c/{cid}")
    assert r.status_code == 200
    return parse_html(r.text)


def by_class(node, tag: str, cls: str) -> list:
    """Elements `tag` inside `node` that have the class `cls`."""
    return [n for n in node.find_all(tag) if cls in (n.attrs.get("class") or "").split()]


def replies(doc):
    return doc.find_all(data_role="assistant")


# Feedback ---------------------------------------------------------------------------------


def thumbs(node) -> dict[str, str]:
    """aria-pressed of 'Good reply' and 'Bad reply' inside `node`."""
    return {b.attrs["aria-label"]: b.attrs["aria-pressed"] for b in node.find_all("button")
            if b.attrs.get("aria-label") in ("Good reply", "Bad reply")}  # fmt: skip


def feedback_url(doc) -> str:
    button = next(b for b in doc.find_all("button") if b.attrs.get("aria-label") == "Good reply")
    return button.attrs["hx-post"]


def test_thumbs_are_stored_with_the_turn_toggle_and_show_pressed(client, settings):
    cid, _ = chat(client, "Rate me")
    doc = page(client, cid)
    assert thumbs(replies(doc)[0]) == {"Good reply": "false", "Bad reply": "false"}
    url = feedback_url(doc)

    r = client.post(url, data={"value": "up"}, headers=HX)
    assert r.status_code == 200
    assert thumbs(parse_html(r.text)) == {"Good reply": "true", "Bad reply": "false"}
    assert rows(settings, "select feedback from turns") == [("up",)]
    assert thumbs(replies(page(client, cid))[0]) == {"Good reply": "true", "Bad reply": "false"}
    # Pressing the pressed one again takes it back: the button posts the empty value.
    pressed = next(
        b for b in parse_html(r.text).find_all("button") if b.attrs["aria-pressed"] == "true"
    )
    assert json.loads(pressed.attrs["hx-vals"]) == {"value": ""}

    client.post(url, data={"value": "down"}, headers=HX)
    assert rows(settings, "select feedback from turns") == [("down",)]
    client.post(url, data={"value": ""}, headers=HX)
    assert rows(settings, "select feedback from turns") == [(None,)]


def test_feedback_is_refused_for_bad_values_and_other_peoples_turns(
    client, other_browser, settings
):
    cid, _ = chat(client, "Mine")
    url = feedback_url(page(client, cid))
    assert client.post(url, data={"value": "sideways"}, headers=HX).status_code == 422
    assert other_browser.post(url, data={"value": "down"}, headers=HX).status_code == 404
    assert rows(settings, "select feedback from turns") == [(None,)]


def test_feedback_is_in_both_exports_and_an_import_keeps_it(client, settings):
    cid, _ = chat(client, "First")
    chat(client, "Second", cid=cid)
    doc = page(client, cid)
    urls = [b.attrs["hx-post"] for b in doc.find_all("button")
            if b.attrs.get("aria-label") == "Good reply"]  # fmt: skip
    client.post(urls[0], data={"value": "up"}, headers=HX)
    client.post(urls[1], data={"value": "down"}, headers=HX)

    markdown = client.get(f"/c/{cid}/export.md").text
    assert markdown.count("_(rated good)_") == 1 and markdown.count("_(rated bad)_") == 1
    assert markdown.index("_(rated good)_") < markdown.index("Second")

    raw = client.get(f"/c/{cid}/export.json").content
    messages = ModelMessagesTypeAdapter.validate_json(raw)
    meta = [m.metadata for m in messages if m.kind == "response"]
    assert [(m or {}).get("feedback") for m in meta] == ["up", "down"]

    r = client.post("/import", files={"file": ("mine.json", raw, "application/json")}, headers=HX)
    assert r.status_code == 204
    new = r.headers["HX-Redirect"].rsplit("/", 1)[1]
    got = rows(settings, "select feedback from turns where conversation_id = ? order by id", [new])
    assert got == [("up",), ("down",)]
    # The rating is the app's, not part of the history the model reads.
    stored = rows(settings, "select messages from turns where conversation_id = ?", [new])
    assert all("feedback" not in m for (m,) in stored)


def test_an_import_with_a_bad_feedback_value_keeps_none():
    from chat.transcript import split_turns

    data = json.loads(
        ModelMessagesTypeAdapter.dump_json([ModelRequest(parts=[UserPromptPart(content="q")])])
    )
    data.append({"kind": "response", "parts": [{"part_kind": "text", "content": "a"}],
                 "metadata": {"feedback": "<script>"}})  # fmt: skip
    (turn,) = split_turns(json.dumps(data).encode())
    assert turn.get("feedback") is None


# Comparisons ------------------------------------------------------------------------------


TWO = ("model-a", "model-b")


def test_a_comparison_shows_as_columns_after_reload_and_after_keep(make_client, model, settings):
    client = make_client(model, models=TWO)
    r = send(client, "Which is better?", compare=list(TWO))
    assert len(re.findall(r'sse-connect="([^"]+)"', r.text)) == 2
    for url in re.findall(r'sse-connect="([^"]+)"', r.text):
        with client.stream("GET", url) as s:
            b"".join(s.iter_bytes())
    cid = r.headers["HX-Push-Url"].rsplit("/", 1)[1]

    doc = page(client, cid)
    (columns,) = by_class(doc, "div", "compare")
    heads = by_class(columns, "div", "compare-head")
    assert [h.find("span").text for h in heads] == list(TWO)
    assert len(replies(columns)) == 2 and len(replies(doc)) == 2
    # The first is the one the chat continues from; the other offers Keep.
    assert "Kept" in heads[0].text and "Keep this reply" in heads[1].text

    keep = heads[1].find("button").attrs["hx-post"]
    kept = parse_html(client.post(keep, headers=HX).text)
    heads = by_class(by_class(kept, "div", "compare")[0], "div", "compare-head")
    assert "Keep this reply" in heads[0].text and "Kept" in heads[1].text
    doc = page(client, cid)
    assert len(by_class(doc, "div", "compare")) == 1

    # The next message, sent without compare, goes to one model and follows the kept reply.
    chat(client, "And now?", cid=cid)
    assert rows(settings, "select count(*) from turns where parent_id is not null") == [(1,)]
    doc = page(client, cid)
    assert len(by_class(doc, "div", "compare")) == 1 and len(replies(doc)) == 3


def test_the_compare_picker_says_its_state(make_client, model):
    client = make_client(model, models=TWO)
    doc = parse_html(client.get("/").text)
    summary = by_class(doc, "details", "compare-pick")[0].find("summary")
    assert summary.find("span", id="compare-state").attrs["aria-live"] == "polite"


# Deleting the open conversation -----------------------------------------------------------


def test_deleting_the_open_conversation_turns_the_page_into_a_new_chat(client):
    cid, _ = chat(client, "Delete me")
    other, _ = chat(client, "Keep me")
    # Deleting another conversation from this page changes only its entry.
    r = client.post(f"/c/{other}/delete", headers={**HX, "HX-Current-URL": f"http://t/c/{cid}"})
    assert r.status_code == 200 and "HX-Push-Url" not in r.headers
    assert 'id="messages"' not in r.text

    r = client.post(f"/c/{cid}/delete", headers={**HX, "HX-Current-URL": f"http://t/c/{cid}"})
    assert r.status_code == 200
    assert r.headers["HX-Push-Url"] == "/"
    doc = parse_html(r.text)
    assert "Undo" in doc.find("li", id=f"conv-{cid}").text
    messages = doc.find("div", id="messages")
    assert messages.attrs["hx-swap-oob"] == "true" and messages.find("div", id="welcome")
    assert doc.find("input", id="cid").attrs["value"] == ""
    assert doc.find("h1", id="chat-title").text == "New chat"
    # The composer now starts a new conversation.
    r = send(client, "After the delete", cid="")
    assert r.headers["HX-Push-Url"] != f"/c/{cid}"


# Regenerate -------------------------------------------------------------------------------


def buttons(node) -> list[str]:
    return [b.text.strip() for b in node.find_all("button")]


def test_regenerate_is_offered_on_the_last_reply_only_and_refused_on_earlier_ones(
    client, model, settings
):
    cid, _ = chat(client, "One")
    chat(client, "Two", cid=cid)
    first, last = replies(page(client, cid))
    assert "Regenerate" not in buttons(first) and "Regenerate" in buttons(last)

    calls = len(model.calls)
    earlier = rows(settings, "select min(id) from turns")[0][0]
    r = client.post(f"/c/{cid}/turns/{earlier}/regenerate", headers=HX)
    assert r.status_code == 409
    assert "Only the last reply can be regenerated" in parse_html(r.text).text
    assert rows(settings, "select count(*) from turns") == [(2,)]
    assert len(model.calls) == calls
    # The page still shows both exchanges.
    assert len(replies(page(client, cid))) == 2


def test_retry_is_offered_on_the_last_failed_reply_only(make_client, scripted, settings):
    from tests.conftest import ModelBroke

    client = make_client(scripted(["Part"], error=ModelBroke("boom")))
    cid, _ = chat(client, "One")
    chat(client, "Two", cid=cid)
    first, last = replies(page(client, cid))
    assert first.find(role="alert") and "Retry" not in buttons(first)
    assert "Retry" in buttons(last)


# Search -----------------------------------------------------------------------------------


def test_search_finds_word_prefixes_and_titles(client):
    cid, _ = chat(client, "I write python every day")
    client.post(f"/c/{cid}/rename", data={"title": "Gardening notes"}, headers=HX)
    doc = parse_html(client.get("/search", params={"q": "pyth"}).text)
    link = doc.find("a")
    assert "python" in link.text and link.attrs["href"].startswith(f"/c/{cid}?at=")
    assert doc.find("mark").text == "python"

    doc = parse_html(client.get("/search", params={"q": "garden"}).text)
    (link,) = doc.find_all("a")
    assert link.attrs["href"] == f"/c/{cid}" and "Gardening notes" in link.text
    assert doc.find("mark").text == "Garden"


# Sidebar groups ---------------------------------------------------------------------------


NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("stamp", "label"),
    [
        ("2026-11-20T00:01:00+00:00", "Today"),
        ("2026-11-19T23:59:00+00:00", "Yesterday"),
        ("2026-11-18T12:00:00+00:00", "Previous 7 days"),
        ("2026-11-13T12:00:00+00:00", "Previous 7 days"),
        ("2026-11-12T12:00:00+00:00", "Previous 30 days"),
        ("2026-10-21T12:00:00+00:00", "Previous 30 days"),
        ("2026-10-20T12:00:00+00:00", "October 2026"),
        ("2025-11-30T12:00:00+00:00", "November 2025"),
    ],
)
def test_group_labels(stamp, label):
    assert group_label(stamp, NOW) == label


def test_the_sidebar_shows_groups_in_order_of_last_activity():
    stamps = ["2026-11-20T10:00", "2026-11-19T10:00", "2026-11-15T10:00", "2026-11-01T10:00",
              "2026-09-02T10:00", "2026-08-02T10:00"]  # fmt: skip
    convs = [{"id": f"c{i}", "title": f"T{i}", "updated_at": s} for i, s in enumerate(stamps)]
    from web.links import conv_links

    doc = parse_html(
        __import__("fastcore.xml").xml.to_xml(
            Sidebar(convs, {c["id"]: conv_links(c["id"]) for c in convs}, None, NOW)
        )
    )
    assert [h.text for h in doc.find_all("h2")] == [
        "Today", "Yesterday", "Previous 7 days", "Previous 30 days", "September 2026",
        "August 2026",
    ]  # fmt: skip


# The demo model ---------------------------------------------------------------------------


def test_the_demo_models_first_reply_says_what_to_try_and_each_phrase_calls_a_tool(settings):
    first = demo_reply([ModelRequest(parts=[UserPromptPart(content="hi")])], settings)
    tools = {t.name for t in toolset.tools.values()} if hasattr(toolset, "tools") else None
    for phrase, _ in TRY_PHRASES:
        assert f"`{phrase}`" in first
        call = demo_tool_call(phrase)
        assert call is not None, phrase
        if tools is not None:
            assert call[0] in tools
    assert first.index("Things to try") < first.index("You wrote")


def test_a_phrase_from_the_first_reply_makes_the_demo_model_use_its_tool(make_client):
    client = make_client(None)
    r = send(client, "hello")
    shown = " ".join(e.data for e in stream(client, r.text))
    phrase = next(p for p, _ in TRY_PHRASES if p.startswith("calculate"))
    assert phrase in shown
    cid = r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    r = send(client, phrase, cid=cid)
    shown = " ".join(e.data for e in stream(client, r.text))
    assert "calculate" in shown and "84" in shown


# What the user is told --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai-chat:gpt-4o-mini", "nosuchprovider:some-model"])
def test_a_model_that_cannot_start_is_explained_to_the_user_and_logged_for_the_operator(
    settings, caplog, monkeypatch, name
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model(name, settings)
    with caplog.at_level("WARNING", logger="chat"):
        message = describe_error(caught.value)
    assert "could not be started" in message and name in message
    for developer_word in ("environment", "OPENAI_API_KEY", "Traceback", "Unknown model", "`"):
        assert developer_word not in message, developer_word
    # The reason is kept for the operator, in the log.
    assert str(caught.value) in caplog.text


def test_usage_limits_speak_to_users():
    for message in (describe_error(UsageLimitExceeded("exceeds 10 tokens")), OUTPUT_LIMIT):
        assert "MAX_" not in message and "tokens" not in message
        assert "continue" in message
