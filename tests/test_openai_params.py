"""Chat-completion requests skip the OpenAI SDK's type walk, and still send the same JSON.

The request bodies are caught by a mock transport: the same conversation (text, a tool call and
its result, a retry, an image) is sent once through the SDK's own transform and once through
`chat.openai_params.plain`, and what reached the model must be byte for byte the same.
"""

from __future__ import annotations

import json
from typing import Annotated, TypedDict

import httpx2
import pydantic
import pytest
from openai import NOT_GIVEN, AsyncOpenAI, omit
from openai.types.chat import completion_create_params
from pydantic_ai.messages import (
    ImageUrl,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from chat.agent import build_agent
from chat.tools import ToolDeps

# These tests name the SDK's private transform, as the fast path does. On an SDK release without
# it the app falls back (tests/test_openai_fast.py): nothing here is left to compare.
try:
    from openai._utils import _transform as sdk_transform
    from openai.resources.chat.completions import completions as sdk_completions

    from chat import openai_params
except (ImportError, AttributeError) as exc:
    pytest.skip(f"request-parameter fast path off on this SDK: {exc}", allow_module_level=True)

STREAMING = completion_create_params.CompletionCreateParamsStreaming

REPLY = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"fake",'
    b'"choices":[{"index":0,"delta":{"content":"Fine."},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)

HISTORY = [
    ModelRequest(parts=[UserPromptPart(content="What is 6*7?")]),
    ModelResponse(parts=[ToolCallPart("calculate", {"expression": "6*7"}, tool_call_id="c1")]),
    ModelRequest(parts=[ToolReturnPart("calculate", "42", tool_call_id="c1")]),
    ModelResponse(parts=[ToolCallPart("current_time", {"timezone": "Mars"}, tool_call_id="c2")]),
    ModelRequest(
        parts=[
            ToolReturnPart("current_time", "Unknown timezone", tool_call_id="c2", outcome="retried")
        ]
    ),
    ModelResponse(parts=[TextPart("It is **42**, and I could not tell the time on Mars.")]),
    ModelRequest(
        parts=[UserPromptPart(content=["What is this?", ImageUrl("https://example.test/a.png")])]
    ),
    ModelResponse(parts=[TextPart("A picture.")]),
]


@pytest.fixture(autouse=True)
def _mock_provider():
    with override_allow_model_requests(True):  # a mock transport inside the test
        yield


async def sent_body(store) -> dict:
    """What one agent run (the app's agent, with its tools and this history) sent the model."""
    bodies: list[bytes] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        bodies.append(request.content)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=REPLY)

    client = AsyncOpenAI(
        api_key="x",
        base_url="http://model.test/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    model = OpenAIChatModel("fake", provider=OpenAIProvider(openai_client=client))
    agent = build_agent()
    async with agent.run_stream_events(  # streamed, as the app's runs are
        "And now?", model=model, message_history=HISTORY, deps=ToolDeps(store, "u1")
    ) as events:
        async for _ in events:
            pass
    assert events.result is not None and events.result.output == "Fine."
    assert len(bodies) == 1
    return json.loads(bodies[0])


async def test_the_model_receives_the_same_request_either_way(monkeypatch, tmp_path):
    from chat.store import ChatStore

    store = ChatStore(tmp_path / "chat.db")
    walked: list[object] = []

    async def sdk_transform_spy(data, expected_type):
        walked.append(expected_type)
        return await sdk_transform.async_maybe_transform(data, expected_type)

    monkeypatch.setattr(sdk_completions, "async_maybe_transform", sdk_transform_spy)
    by_sdk = await sent_body(store)
    assert walked == [STREAMING]  # the SDK's walk really ran for the reference request

    walked.clear()
    monkeypatch.setattr(sdk_completions, "async_maybe_transform", openai_params._maybe_transform)
    monkeypatch.setattr(openai_params, "_sdk_maybe_transform", sdk_transform_spy)
    by_plain = await sent_body(store)
    assert walked == []  # ...and did not run for this one

    assert by_plain == by_sdk
    assert [m["role"] for m in by_plain["messages"]] == [
        "system", "user", "assistant", "tool", "assistant", "tool", "assistant", "user",
        "assistant", "user",
    ]  # fmt: skip
    assert {t["function"]["name"] for t in by_plain["tools"]} >= {"calculate", "current_time"}


class Shape(pydantic.BaseModel):
    kind: str
    size: int = 3


async def test_plain_does_what_the_sdk_transform_does_to_these_types():
    data = {
        "model": "fake",
        "messages": ({"role": "user", "content": "hi"}, {"role": "assistant", "content": None}),
        "stop": (s for s in ["END", "STOP"]),  # any iterable becomes a list
        "metadata": {"a": "b"},
        "response_format": Shape(kind="x"),  # a pydantic model is dumped (set fields only)
        "temperature": NOT_GIVEN,
        "top_p": omit,  # omitted values are dropped
        "stream": True,
    }
    expected = await sdk_transform.async_transform({**data, "stop": ["END", "STOP"]}, STREAMING)
    assert openai_params.plain(data) == expected
    assert expected["response_format"] == {"kind": "x"}
    assert "temperature" not in expected and "top_p" not in expected


class Renamed(TypedDict, total=False):
    card_id: Annotated[str, sdk_transform.PropertyInfo(alias="cardID")]


class Dated(TypedDict, total=False):
    when: Annotated[str, sdk_transform.PropertyInfo(format="iso8601")]


class Outer(TypedDict, total=False):
    items: list[int | Renamed]


class Harmless(TypedDict, total=False):
    kind: Annotated[str, sdk_transform.PropertyInfo(discriminator="type")]
    nested: list[dict[str, object]]


def test_an_alias_or_a_format_anywhere_keeps_the_sdk_transform(monkeypatch):
    assert openai_params.changes_data(Outer)  # an alias two levels down, inside a union
    assert openai_params.changes_data(Dated)
    assert not openai_params.changes_data(Harmless)
    assert not openai_params.changes_data(STREAMING)  # today's chat-completion parameters

    original = sdk_transform.async_maybe_transform
    monkeypatch.setattr(sdk_completions, "async_maybe_transform", original)
    monkeypatch.setattr(openai_params, "_PARAMS", (Outer,))
    assert openai_params.install() is False
    assert sdk_completions.async_maybe_transform is original  # left alone


def test_configured_openai_models_use_the_parameter_fast_path(monkeypatch):
    from chat import openai_fast
    from chat.agent import resolve_model
    from chat.config import Settings

    # As a fresh process: nothing installed yet.
    monkeypatch.setattr(
        sdk_completions, "async_maybe_transform", sdk_transform.async_maybe_transform
    )
    monkeypatch.setattr(openai_fast, "_state", None)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    resolve_model("openai-chat:gpt-4o-mini", Settings.from_env())
    state = openai_fast.status()
    assert state is not None
    if not state.params:  # a fallback, logged and tested in tests/test_openai_fast.py
        pytest.skip(f"request-parameter fast path off on this SDK: {state.missing}")
    assert state.stream is not None or "stream reads" in state.missing
