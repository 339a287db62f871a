"""Agent features on screen: tool calls live and stored, personas, model choice, usage, limits,
stalls (route level, FunctionModel), and side-by-side replies and usage end to end."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import pytest
from pydantic_ai.messages import ModelRequest, RetryPromptPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, FunctionModel
from starlette.testclient import TestClient

from chat.agent import INSTRUCTIONS
from chat.config import Settings
from chat.personas import load_personas
from tests.conftest import HX, parse_html, parse_sse, send, stream
from tests.fake_openai import FakeOpenAI, Fault
from tests.live import (  # noqa: F401  (fixtures are used by name)
    HtmxClient,
    app_fixture,
    fake_fixture,
    fake_server_fixture,
    running_app,
)


@pytest.fixture
def app_client(settings):
    """Factory: a started client on an app whose settings overrides may set `model`/`models`."""
    import main

    clients: list[TestClient] = []

    def make(fm=None, **overrides) -> TestClient:
        app = main.create_app(Settings(**{**settings.__dict__, **overrides}), model=fm)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def tool_model(name: str, args: dict, seen: list | None = None) -> FunctionModel:
    """Calls tool `name` once, then answers with what the tool returned."""

    async def fn(messages, info: AgentInfo):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        last = messages[-1]
        results = [
            p for p in getattr(last, "parts", []) if isinstance(p, ToolReturnPart | RetryPromptPart)
        ]
        if isinstance(last, ModelRequest) and results:
            if seen is not None:
                seen.extend(results)
            first = results[0]
            said = first.model_response() if isinstance(first, RetryPromptPart) else first.content
            yield f"The tool said: {said}"
            return
        yield {0: DeltaToolCall(name=name, json_args=json.dumps(args), tool_call_id="call-1")}

    return FunctionModel(stream_function=fn)


def test_tool_call_streams_into_the_reply_and_is_there_after_reload(make_client, monkeypatch):
    import chat.tools

    # Sync tools run in a worker thread: hold this one until the page has seen it running.
    gate = threading.Event()
    real = chat.tools.evaluate

    def held(expression: str):
        assert gate.wait(10), "the test never saw the tool running"
        return real(expression)

    monkeypatch.setattr(chat.tools, "evaluate", held)
    seen: list = []
    client = make_client(tool_model("calculate", {"expression": "6*7"}, seen))
    r = send(client, "what is 6*7?")
    url = re.search(r'sse-connect="([^"]+)"', r.text).group(1)
    body = ""
    with client.stream("GET", url) as s:
        for line in s.iter_lines():
            body += line + "\n"
            if "Running" in line:
                gate.set()  # the call is on the page with its arguments: let the tool finish
    gate.set()
    events = parse_sse(body)
    tool_events = [e.data for e in events if e.name == "blocks" and "tool-call-1" in e.data]
    # First the call with its arguments while it runs, then the same element with its result.
    assert "Running" in tool_events[0] and "6*7" in tool_events[0]
    assert 'hx-swap-oob="true"' in tool_events[-1] and "6*7 = 42" in tool_events[-1]
    assert seen and "6*7 = 42" in str(seen[0].content)
    cid = r.headers["HX-Push-Url"]
    page = parse_html(client.get(cid).text)
    reply = page.find_all(None, data_role="assistant")[0]
    tool = reply.find("details", id="tool-call-1")
    assert "calculate" in tool.text and "6*7 = 42" in tool.text
    assert "The tool said: 6*7 = 42" in reply.text


def test_tool_errors_show_as_retries(make_client):
    client = make_client(tool_model("current_time", {"timezone": "Mars/Olympus"}))
    r = send(client, "time on mars?")
    events = stream(client, r.text)
    last_tool = [e.data for e in events if "tool-call-1" in e.data][-1]
    assert "retried" in last_tool and "Unknown timezone" in last_tool


def test_demo_model_calls_a_tool_offline(make_client):
    client = make_client(None)  # no override: the built-in demo model
    r = send(client, "What is 12*(3+4)?")
    events = stream(client, r.text)
    body = "".join(e.data for e in events)
    assert "calculate" in body and "12*(3+4) = 84" in body
    assert events[-1].data == "complete"


def test_persona_instructions_reach_the_model(make_client, scripted):
    model = scripted(["ok"])
    client = make_client(model)
    coach = load_personas()["coach"]
    seen: list[str] = []
    original = model.model.stream_function

    async def spy(messages, info):
        seen.append(info.instructions or "")
        async for chunk in original(messages, info):
            yield chunk

    model.model.stream_function = spy
    page = client.get("/").text
    assert "Writing coach" in page  # offered in the picker
    r = send(client, "improve my essay", persona="coach")
    stream(client, r.text)
    assert any(coach.instructions in s for s in seen)
    assert any(INSTRUCTIONS in s for s in seen)  # added to the base instructions, not instead


def test_unknown_persona_or_model_is_refused(make_client, scripted):
    model = scripted(["ok"])
    client = make_client(model)
    for field in ({"persona": "pirate"}, {"model": "openai-chat:not-offered"}):
        r = client.post("/send", data={"msg": "hi", **field}, headers=HX)
        assert r.status_code == 422 and "Pick one from the list" in r.text
    assert model.calls == []


def test_a_model_that_cannot_start_gives_a_clear_message(app_client):
    bad = "nosuchprovider:some-model"
    client = app_client(None, model=bad, models=(bad,))
    r = send(client, "hello")
    events = stream(client, r.text)
    assert events[-1].data == "failed"
    end = next(e.data for e in events if e.name == "end")
    assert 'role="alert"' in end and "could not be started" in end
    assert "Traceback" not in end


def test_usage_limit_stops_the_reply_with_a_clear_message(make_client, scripted):
    client = make_client(scripted(["word " * 50]), output_tokens_limit=5)
    r = send(client, "talk a lot")
    events = stream(client, r.text)
    assert events[-1].data == "failed"
    end = next(e.data for e in events if e.name == "end")
    assert "usage limit" in end and "Consider" not in end


def test_a_stalled_model_ends_with_an_error(make_client):
    async def slow(messages, info):
        if INSTRUCTIONS not in (info.instructions or ""):
            yield "Title"
            return
        yield "Starting"
        await asyncio.sleep(30)
        yield "never"

    client = make_client(FunctionModel(stream_function=slow), stall_timeout=0.3)
    r = send(client, "hello")
    events = stream(client, r.text)
    assert events[-1].data == "failed"
    end = next(e.data for e in events if e.name == "end")
    assert "stopped sending" in end
    page = client.get(r.headers["HX-Push-Url"]).text
    assert "Starting" in page  # the partial reply is kept


def test_model_choice_is_stored_with_the_conversation(app_client, scripted):
    choices = ("openai-chat:a", "openai-chat:b")
    client = app_client(scripted(["ok"]).model, models=choices)
    r = send(client, "hi", model="openai-chat:b")
    stream(client, r.text)
    page = client.get(r.headers["HX-Push-Url"]).text
    picker = parse_html(page).find("select", id="model")
    selected = [o for o in picker.find_all("option") if "selected" in o.attrs]
    assert [o.attrs["value"] for o in selected] == ["openai-chat:b"]


# End to end: side by side, and usage as the provider reported it ------------------------------


def test_side_by_side_replies_from_two_models_stream_in_parallel(fake: FakeOpenAI, tmp_path):
    fake.configure(lambda body: f"Answer from {body['model']}. " + "more " * 25, delay=0.02)
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "t",
        "MODELS": "openai-chat:fake-a,openai-chat:fake-b",
    }
    with running_app(tmp_path / "compare", model="openai-chat:fake-a", **env) as app:
        with HtmxClient(app.url) as client:
            client.open("/")
            r = client.http.post(
                "/send",
                data={
                    "msg": "Compare yourselves",
                    "compare": ["openai-chat:fake-a", "openai-chat:fake-b"],
                },
                headers={"HX-Request": "true", "Origin": app.url},
            )
            assert r.status_code == 200, r.text
            urls = re.findall(r'sse-connect="([^"]+)"', r.text)
            assert len(urls) == 2 and "compare" in r.text
            timeline: dict[str, list[tuple[float, str]]] = {u: [] for u in urls}

            def read(url: str) -> None:
                http = httpx.Client(
                    base_url=app.url, cookies=client.http.cookies, timeout=30, trust_env=False
                )
                with http, http.stream("GET", url) as s:
                    for line in s.iter_lines():
                        timeline[url].append((time.monotonic(), line))
                        if line.startswith("event: done"):
                            return

            threads = [threading.Thread(target=read, args=(u,)) for u in urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
    texts = ["\n".join(line for _, line in timeline[u]) for u in urls]
    assert "fake-a" in texts[0] and "fake-b" in texts[1]
    a, b = (timeline[u] for u in urls)
    # Interleaved: each stream was still sending after the other had started.
    assert a[0][0] < b[-1][0] and b[0][0] < a[-1][0]
    assert sorted(r.body["model"] for r in fake.requests if "short title" not in str(r.body))[
        :2
    ] == [
        "fake-a",
        "fake-b",
    ]


def test_usage_shown_matches_what_the_provider_reported(fake: FakeOpenAI, tmp_path):
    fake.configure("one two three four five six seven")
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t"}
    with running_app(tmp_path / "usage", **env) as app, HtmxClient(app.url) as client:
        sent = client.send("Count for me")
        client.follow(sent.stream_url)
        request = next(r for r in fake.requests if "short title" not in str(r.body))
        prompt = sum(len(str(m.get("content") or "").split()) for m in request.body["messages"])
        completion = request.tokens_sent
        stored = json.loads(app.turns()[-1]["usage"])
        assert (stored["input_tokens"], stored["output_tokens"]) == (prompt, completion)
        page = client.open(f"/c/{sent.cid}")
        usage = page.find(attrs={"data-role": "assistant"}).find(attrs={"data-usage": True})
        assert f"{prompt:,} in · {completion:,} out" in usage.get_text()
        assert "tok/s" in usage.get_text() and "first token" in usage.get_text()


def test_a_429_is_retried_once_after_its_retry_after(fake: FakeOpenAI, tmp_path):
    fake.configure("Worth the wait.", script=[Fault.http(429, retry_after=1)])
    env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "t"}
    with running_app(tmp_path / "retry", **env) as app, HtmxClient(app.url) as client:
        sent = client.send("Busy?")
        assert client.follow(sent.stream_url)[-1].data == "complete"
    limited, ok = [r for r in fake.requests if "short title" not in str(r.body)]
    assert limited.fault.status == 429 and ok.completed
    # The retry waited for the Retry-After the server asked for.
    assert ok.started - limited.started >= 0.95
