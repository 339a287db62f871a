"""Tool approval: a reply pauses on a call that needs approval, and Approve / Deny resume it.

Route level with FunctionModels: the pause (call and arguments shown, buttons), approving (the
tool runs once, the reply continues in the same message), denying (the model is told), the card
after a reload and after a restart, other users (404), expiry, and the MCP `approve` list.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pydantic_ai.messages import ModelRequest, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel

import chat.approvals
import chat.tools
from chat.agent import INSTRUCTIONS
from tests.conftest import HX, parse_html, parse_sse, send, stream
from tests.test_mcp import calls_made, write_config

RAN: list[str] = []


@pytest.fixture(name="guarded_tool")
def guarded_tool_fixture():
    """A built-in tool marked with the decorator argument, for the length of a test."""

    def launch(target: str) -> str:
        """Launch something at a target (needs the user's approval)."""
        RAN.append(target)
        return f"launched at {target}"

    RAN.clear()
    chat.tools.toolset.tool_plain(requires_approval=True)(launch)
    yield "launch"
    chat.tools.toolset.tools.pop("launch", None)


class ApprovalModel:
    """Calls `tool` once; after the result, says what came back (and whether it was denied)."""

    def __init__(self, tool: str, args: dict):
        self.tool, self.args = tool, args
        self.calls: list[list] = []
        self.model = FunctionModel(stream_function=self._stream, model_name="approval-model")

    async def _stream(self, messages, info: AgentInfo):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        self.calls.append(list(messages))
        last = messages[-1]
        returns = [p for p in getattr(last, "parts", []) if isinstance(p, ToolReturnPart)]
        if isinstance(last, ModelRequest) and returns:
            r = returns[0]
            yield f"After the tool ({r.outcome}): {r.content}"
            return
        yield "Let me do that. "
        yield {1: DeltaToolCall(name=self.tool, json_args=json.dumps(self.args), tool_call_id="a1")}


def paused(client, msg="go"):
    """Send `msg` and follow the reply to its pause; return the conversation URL and reply id."""
    r = send(client, msg)
    events = stream(client, r.text)
    assert events[-1].data == "awaiting_approval", [e.data[:200] for e in events]
    tid = int(parse_html(r.text).find("article", data_role="assistant").attrs["id"][6:])
    return r.headers["HX-Push-Url"], tid, events


def card(client, url: str, tid: int):
    """The approval card as the page loads it."""
    page = parse_html(client.get(url).text)
    loader = page.find("article", id=f"reply-{tid}").find(**{"class": "approval-loading"})
    return parse_html(client.get(loader.attrs["hx-get"], headers=HX).text)


def decide(client, card_html, label: str):
    button = next(b for b in card_html.find_all("button") if b.text == label)
    return client.post(button.attrs["hx-post"], headers=HX)


def test_a_call_needing_approval_pauses_with_its_arguments_and_buttons(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    url, tid, events = paused(client)
    text = " ".join(e.data for e in events)
    assert "Let me do that." in text and "the moon" in text
    assert RAN == []
    c = card(client, url, tid)
    approval = c.find(**{"class": "approval"})
    assert approval.attrs["aria-label"] == "Tool approval"
    assert "launch" in approval.text and "the moon" in approval.text
    assert [b.text for b in approval.find_all("button")] == ["Approve", "Deny"]
    # The call in the reply says it waits (an out-of-band update of the tool element).
    assert "Waiting for approval" in c.find("details", id="tool-a1").text


def test_approve_runs_the_tool_once_and_the_reply_continues_in_the_same_message(
    make_client, guarded_tool
):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    url, tid, _ = paused(client)
    c = card(client, url, tid)
    r = decide(client, c, "Approve")
    assert r.status_code == 200
    reply = parse_html(r.text).find("article", id=f"reply-{tid}")
    assert reply.attrs["sse-connect"].endswith(f"/turns/{tid}/stream")
    events = stream(client, r.text)
    text = " ".join(e.data for e in events)
    assert events[-1].data == "complete"
    assert "Let me do that." in text and "After the tool (success): launched at the moon" in text
    assert RAN == ["the moon"]
    # A second click (another tab, a double click) does not run it again.
    assert decide(client, c, "Approve").status_code == 200
    assert RAN == ["the moon"]
    page = parse_html(client.get(url).text)
    replies = page.find_all("article", data_role="assistant")
    assert len(replies) == 1
    shown = replies[0].text
    assert "Let me do that." in shown and "launched at the moon" in shown
    assert "Waiting for your approval" not in shown


def test_deny_tells_the_model_and_the_tool_never_runs(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    url, tid, _ = paused(client)
    events = stream(client, decide(client, card(client, url, tid), "Deny").text)
    text = " ".join(e.data for e in events)
    assert RAN == []
    assert "After the tool (denied): The user denied this tool call" in text
    assert "Denied" in text
    assert events[-1].data == "complete"


def test_the_pending_approval_survives_reload_and_restart(make_client, settings, guarded_tool):
    model = ApprovalModel("launch", {"target": "mars"})
    first = make_client(model.model)
    url, tid, _ = paused(first)
    assert "mars" in card(first, url, tid).text  # a reload shows it again
    cookies = dict(first.cookies)
    first.__exit__(None, None, None)
    second = make_client(model.model)  # a new app on the same database
    second.cookies.update(cookies)
    c = card(second, url, tid)
    assert "mars" in c.text
    events = stream(second, decide(second, c, "Approve").text)
    assert events[-1].data == "complete" and RAN == ["mars"]


def test_someone_else_gets_404(client, make_client, guarded_tool, other_browser):
    model = ApprovalModel("launch", {"target": "x"})
    owner = make_client(model.model)
    url, tid, _ = paused(owner)
    c = card(owner, url, tid)
    intruder = owner.__class__(owner.app)
    intruder.portal = owner.portal
    assert intruder.get(url.replace("/c/", "/c/") + f"/turns/{tid}/approvals").status_code == 404
    for button in c.find_all("button"):
        assert intruder.post(button.attrs["hx-post"], headers=HX).status_code == 404
    assert RAN == []
    assert owner.get(url).status_code == 200


def test_an_approval_expires_with_a_clear_note(make_client, guarded_tool, monkeypatch):
    model = ApprovalModel("launch", {"target": "x"})
    client = make_client(model.model, tool_approval_ttl=600)
    url, tid, _ = paused(client)
    c = card(client, url, tid)
    later = chat.approvals.now() + timedelta(seconds=601)
    monkeypatch.setattr(chat.approvals, "now", lambda: later)
    r = decide(client, c, "Approve")
    assert RAN == []
    note = "waited more than 10 minutes for approval and expired; nothing was run"
    page = parse_html(client.get(url).text)
    reply = page.find("article", id=f"reply-{tid}")
    assert note in reply.find(role="alert").text, r.text
    # The conversation goes on: the next reply's history answers the expired call.
    model.tool = "calculate"
    model.args = {"expression": "1+1"}
    stream(client, send(client, "next", cid=url.rsplit("/", 1)[1]).text)
    assert any(
        isinstance(p, ToolReturnPart) and "never approved" in str(p.content)
        for m in model.calls[-1]
        for p in getattr(m, "parts", [])
    )


def test_a_newer_message_supersedes_a_pending_approval(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "x"})
    client = make_client(model.model)
    url, tid, _ = paused(client)
    c = card(client, url, tid)
    model.tool, model.args = "calculate", {"expression": "2+2"}
    stream(client, send(client, "never mind", cid=url.rsplit("/", 1)[1]).text)
    decide(client, c, "Approve")
    assert RAN == []
    reply = parse_html(client.get(url).text).find("article", id=f"reply-{tid}")
    assert "newer message was sent" in reply.find(role="alert").text


@pytest.mark.slow  # starts the MCP server as a process
def test_an_mcp_tool_named_in_approve_waits_for_approval(make_client, tmp_path):
    model = ApprovalModel("tools_write_note", {"text": "remember milk"})
    client = make_client(model.model, mcp_config=write_config(tmp_path, approve=["write_note"]))
    url, tid, _ = paused(client)
    assert calls_made(tmp_path) == []
    events = stream(client, decide(client, card(client, url, tid), "Approve").text)
    assert "note written: remember milk" in " ".join(e.data for e in events)
    assert calls_made(tmp_path) == [{"tool": "write_note", "args": {"text": "remember milk"}}]


def test_stream_of_a_paused_reply_replays_and_ends(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "x"})
    client = make_client(model.model)
    url, tid, _ = paused(client)
    with client.stream("GET", f"{url}/turns/{tid}/stream") as r:
        events = parse_sse(b"".join(r.iter_bytes()).decode())
    assert events[-1].data == "awaiting_approval"
    assert "approvals" in next(e.data for e in events if e.name == "end")


def test_decide_all_answers_calls_by_id_for_other_front_ends(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "x"})
    client = make_client(model.model)
    url, tid, _ = paused(client)
    store = client.app.state.store
    turn = store.turn(tid, next(iter(store.all_conversations()))["owner"])
    assert chat.approvals.decide_all(store, turn, {"nope": True}, 60).state == "gone"
    decision = chat.approvals.decide_all(store, turn, {"a1": False}, 60)
    assert decision.state == "resume"
    assert list(decision.turn["resume"].results.approvals) == ["a1"]
