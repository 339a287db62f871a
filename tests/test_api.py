"""The API for other front ends: Vercel AI data stream chat, and JSON conversations."""

from __future__ import annotations

import json
import re

from pydantic_ai.messages import ModelMessagesTypeAdapter
from starlette.testclient import TestClient

from tests.conftest import parse_sse

HX = {"HX-Request": "true"}
CHAT = {
    "trigger": "submit-message",
    "id": "chat-1",
    "messages": [
        {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Hi from React"}]}
    ],
}


def deltas(body: str) -> str:
    out = ""
    for line in body.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if event.get("type") == "text-delta":
                out += event["delta"]
    return out


def test_vercel_ai_chat_streams_the_same_agent(make_client, scripted):
    model = scripted(["Hello ", "from ", "the agent."])
    client = make_client(model)
    r = client.post("/api/chat", json=CHAT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert deltas(r.text) == "Hello from the agent."
    assert model.prompts == [["Hi from React"]]


def test_api_chat_is_behind_the_same_limits_and_csrf_check(make_client, scripted):
    model = scripted(["ok"])
    client = make_client(model, messages_per_minute=1)
    assert client.post("/api/chat", json=CHAT).status_code == 200
    limited = client.post("/api/chat", json=CHAT)
    assert limited.status_code == 429 and "limit" in limited.json()["error"]
    cross = client.post("/api/chat", json=CHAT, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert len(model.calls) == 1


def test_json_conversations_are_the_callers_own(make_client, scripted):
    client = make_client(scripted(["Stored ", "reply."]))
    r = client.post("/send", data={"msg": "Keep me"}, headers=HX)
    url = re.search(r'sse-connect="([^"]+)"', r.text).group(1)
    with client.stream("GET", url) as s:
        assert parse_sse(b"".join(s.iter_bytes()).decode())[-1].data == "complete"
    cid = r.headers["HX-Push-Url"].rsplit("/", 1)[1]
    listed = client.get("/api/conversations").json()["conversations"]
    assert [c["id"] for c in listed] == [cid] and listed[0]["title"]
    raw = client.get(f"/api/conversations/{cid}")
    messages = ModelMessagesTypeAdapter.validate_json(raw.content)
    assert "Keep me" in raw.text and "Stored reply." in raw.text and len(messages) == 2
    stranger = TestClient(client.app)
    stranger.portal = client.portal
    assert stranger.get("/api/conversations").json() == {"conversations": []}
    assert stranger.get(f"/api/conversations/{cid}").status_code == 404
