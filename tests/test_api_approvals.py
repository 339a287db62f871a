"""Tool approval over /api/chat: the AI SDK 6 tool-approval parts.

A reply that pauses on a call needing approval streams a `tool-approval-request` for it and
ends cleanly; the next request carrying the approval responses decides the calls and streams
the same reply going on. Only the caller's own waiting calls can be decided.
"""

from __future__ import annotations

import json
from datetime import timedelta

from pydantic_ai.messages import ModelRequest, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall
from starlette.testclient import TestClient

import chat.approvals
import chat.tools
from chat.agent import INSTRUCTIONS
from tests.test_api import chunks, deltas
from tests.test_approvals import (  # noqa: F401  (the fixture is used by name)
    RAN,
    ApprovalModel,
    guarded_tool_fixture,
)


def _send(chat_id: str, text: str = "go") -> dict:
    user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {"trigger": "submit-message", "id": chat_id, "messages": [user]}


def _answer(chat_id: str, answers: dict[str, bool], tool: str = "launch") -> dict:
    """What the AI SDK sends after `addToolApprovalResponse`: the whole chat, its last message
    the paused reply with the call in `approval-responded` state."""
    parts = [{"type": "text", "text": "Let me do that. "}]
    for call_id, approved in answers.items():
        parts.append(
            {
                "type": f"tool-{tool}",
                "toolCallId": call_id,
                "state": "approval-responded",
                "input": {"target": "the moon"},
                "approval": {"id": call_id, "approved": approved, "reason": "no thanks"},
            }
        )
    body = _send(chat_id)
    body["messages"].append({"id": "turn-x", "role": "assistant", "parts": parts})
    return body


def _paused(client, chat_id: str = "appr") -> list[dict]:
    r = client.post("/api/chat", json=_send(chat_id))
    assert r.status_code == 200
    return chunks(r.text)


def test_a_paused_reply_asks_for_approval_and_ends_cleanly(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    events = _paused(client)
    kinds = [c["type"] for c in events]
    assert "error" not in kinds and kinds[-1] == "finish"
    call = next(c for c in events if c["type"] == "tool-input-available")
    assert (call["toolCallId"], call["toolName"]) == ("a1", "launch")
    request = next(c for c in events if c["type"] == "tool-approval-request")
    assert request == {"type": "tool-approval-request", "approvalId": "a1", "toolCallId": "a1"}
    assert kinds.index("tool-input-available") < kinds.index("tool-approval-request")
    # The waiting call is not reported as failed or interrupted.
    assert not [c for c in events if c["type"].startswith("tool-output")]
    assert RAN == []


def test_approving_runs_the_tool_once_and_streams_the_reply_going_on(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    _paused(client)
    r = client.post("/api/chat", json=_answer("appr", {"a1": True}))
    assert r.status_code == 200, r.text
    events = chunks(r.text)
    assert "error" not in [c["type"] for c in events]
    out = next(c for c in events if c["type"] == "tool-output-available")
    assert out["toolCallId"] == "a1" and "launched at the moon" in str(out["output"])
    # Only what is new: the client continues the message it holds (the text and the call).
    assert deltas(r.text) == "After the tool (success): launched at the moon"
    assert not [c for c in events if c["type"].startswith("tool-input")]
    assert RAN == ["the moon"]
    # The same answer again (a retry, a second tab) runs nothing more.
    again = client.post("/api/chat", json=_answer("appr", {"a1": True}))
    assert again.status_code == 409 and "waits" in again.json()["error"]
    assert RAN == ["the moon"]
    (conv,) = client.get("/api/conversations").json()["conversations"]
    stored = client.get(f"/api/conversations/{conv['id']}").text
    assert "After the tool (success)" in stored


def test_denying_tells_the_model_and_runs_nothing(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    _paused(client)
    r = client.post("/api/chat", json=_answer("appr", {"a1": False}))
    assert r.status_code == 200, r.text
    assert "After the tool (denied)" in deltas(r.text)
    assert "denied" in deltas(r.text) and "no thanks" not in str(model.calls[-1])
    assert RAN == []


def test_forged_or_foreign_approvals_run_nothing(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    _paused(client)
    calls = len(model.calls)
    # An id that is no waiting call of this chat.
    forged = client.post("/api/chat", json=_answer("appr", {"not-a-call": True}))
    assert forged.status_code == 409 and forged.json()["error"]
    # Another identity naming the same chat id (and the stored conversation id).
    (conv,) = client.get("/api/conversations").json()["conversations"]
    stranger = TestClient(client.app)
    stranger.portal = client.portal
    for chat_id in ("appr", conv["id"]):
        r = stranger.post("/api/chat", json=_answer(chat_id, {"a1": True}))
        assert r.status_code == 404
    # A chat with nothing waiting.
    assert client.post("/api/chat", json=_answer("other", {"a1": True})).status_code == 404
    assert RAN == [] and len(model.calls) == calls
    # The real owner's answer still works afterwards.
    assert client.post("/api/chat", json=_answer("appr", {"a1": True})).status_code == 200
    assert RAN == ["the moon"]


def test_an_expired_approval_is_refused_with_the_pages_note(make_client, guarded_tool, monkeypatch):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model, tool_approval_ttl=600)
    _paused(client)
    later = chat.approvals.now() + timedelta(seconds=601)
    monkeypatch.setattr(chat.approvals, "now", lambda: later)
    r = client.post("/api/chat", json=_answer("appr", {"a1": True}))
    assert r.status_code == 409
    assert "waited more than 10 minutes for approval and expired" in r.json()["error"]
    assert RAN == []
    (conv,) = client.get("/api/conversations").json()["conversations"]
    page = client.get(f"/c/{conv['id']}").text
    assert "expired; nothing was run" in page


def test_an_assistant_message_without_approvals_is_still_refused(make_client, guarded_tool):
    model = ApprovalModel("launch", {"target": "the moon"})
    client = make_client(model.model)
    _paused(client)
    body = _answer("appr", {})
    r = client.post("/api/chat", json=body)
    assert r.status_code == 422 and RAN == []


class TwoCalls(ApprovalModel):
    """Calls the tool twice in one response (ids a1 and a2)."""

    async def _stream(self, messages, info: AgentInfo):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        self.calls.append(list(messages))
        last = messages[-1]
        returns = [p for p in getattr(last, "parts", []) if isinstance(p, ToolReturnPart)]
        if isinstance(last, ModelRequest) and returns:
            yield " / ".join(f"{r.tool_call_id}: {r.outcome}" for r in returns)
            return
        for i, target in ((1, "the moon"), (2, "mars")):
            args = json.dumps({"target": target})
            yield {i: DeltaToolCall(name="launch", json_args=args, tool_call_id=f"a{i}")}


def test_every_waiting_call_is_asked_and_a_partial_answer_waits(make_client, guarded_tool):
    model = TwoCalls("launch", {})
    client = make_client(model.model)
    events = _paused(client)
    asked = [c["toolCallId"] for c in events if c["type"] == "tool-approval-request"]
    assert asked == ["a1", "a2"]
    partial = client.post("/api/chat", json=_answer("appr", {"a1": True}))
    assert partial.status_code == 409 and "still wait" in partial.json()["error"]
    assert RAN == []
    r = client.post("/api/chat", json=_answer("appr", {"a2": False}))
    assert r.status_code == 200, r.text
    assert deltas(r.text) == "a1: success / a2: denied"
    assert RAN == ["the moon"]
