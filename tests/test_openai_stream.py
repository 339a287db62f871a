"""The OpenAI chat stream read a network read at a time (chat/openai_stream.py).

The provider's bytes are served by a mock transport, so each test decides exactly which chunks
arrive together in one read, and what the agent made of them is checked: the text, the tool
call and its arguments, the number of events the agent's pipeline had to carry.
"""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
from openai import AsyncOpenAI
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelAPIError
from pydantic_ai.messages import PartDeltaEvent, TextPartDelta, ToolCallPart
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

# The stream fast path uses the SDK's private names; on a release without them the app falls
# back (tests/test_openai_fast.py) and there is no batched stream to test.
try:
    from chat.openai_stream import batched, merge_chunks
except (ImportError, AttributeError) as exc:
    pytest.skip(f"stream fast path off on this SDK: {exc}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _mock_provider():
    # Requests here go to a mock transport inside the test, never over the network.
    with override_allow_model_requests(True):
        yield


def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    out = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    out.update(extra)
    return out


def sse(*chunks: dict | str) -> bytes:
    return b"".join(
        f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks
    )


def model_over(reads: list[bytes], *, gap: float = 0.0) -> OpenAIChatModel:
    """An OpenAI chat model whose HTTP response arrives as these reads, `gap` seconds apart."""

    async def body():
        for read in reads:
            yield read
            await asyncio.sleep(gap)

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    client = AsyncOpenAI(
        api_key="x",
        base_url="http://model.test/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    return batched(OpenAIChatModel("fake", provider=OpenAIProvider(openai_client=client)))


TOKENS = ["Hello", " **bold**", " world", ".\n\n", "- one", "\n- two"]


async def deltas(model, prompt="hi", agent=None) -> tuple[list[str], object]:
    agent = agent or Agent()
    seen: list[str] = []
    async with agent.run_stream_events(prompt, model=model) as events:
        async for event in events:
            if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                seen.append(event.delta.content_delta)
    return seen, events.result


async def test_tokens_read_together_reach_the_agent_as_one_event():
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": t}) for t in TOKENS),
        chunk({}, "stop"),
        chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}),
        "[DONE]",
    )
    seen, result = await deltas(model_over([body]))
    assert result.output == "".join(TOKENS)
    assert len(seen) <= 1  # six tokens, one read: at most one delta after the part starts
    assert result.usage.output_tokens == 6


async def test_tokens_read_one_by_one_stream_one_by_one():
    reads = [sse(chunk({"role": "assistant", "content": ""}))]
    reads += [sse(chunk({"content": t})) for t in TOKENS]
    reads += [sse(chunk({}, "stop"), "[DONE]")]
    seen, result = await deltas(model_over(reads, gap=0.02))
    assert result.output == "".join(TOKENS)
    assert seen[-len(TOKENS) + 1 :] == TOKENS[1:]  # nothing waits to be merged


async def test_an_event_split_across_reads_is_put_back_together():
    body = sse(*(chunk({"content": t}) for t in TOKENS), chunk({}, "stop"), "[DONE]")
    reads = [body[i : i + 7] for i in range(0, len(body), 7)]
    _, result = await deltas(model_over(reads))
    assert result.output == "".join(TOKENS)


async def test_tool_call_arguments_read_together_call_the_tool_once_with_them_whole():
    calls: list[dict] = []
    agent = Agent()

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        calls.append({"a": a, "b": b})
        return a + b

    first = sse(
        chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "add", "arguments": ""},
                    }
                ],
            }
        ),
        *(
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in ['{"a"', ": 2,", ' "b"', ": 40}"]
        ),
        chunk({}, "tool_calls"),
        "[DONE]",
    )
    second = sse(chunk({"content": "It is 42."}), chunk({}, "stop"), "[DONE]")
    bodies = iter([first, second])
    seen: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=next(bodies)
        )

    client = AsyncOpenAI(
        api_key="x",
        base_url="http://model.test/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    model = batched(OpenAIChatModel("fake", provider=OpenAIProvider(openai_client=client)))
    _, result = await deltas(model, "add 2 and 40", agent)

    assert calls == [{"a": 2, "b": 40}]
    assert result.output == "It is 42."
    [call] = [p for m in result.all_messages() for p in m.parts if isinstance(p, ToolCallPart)]
    assert call.args_as_dict() == {"a": 2, "b": 40}
    tool_message = seen[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == "42"


async def test_an_error_event_in_the_stream_fails_the_reply():
    body = sse(chunk({"content": "Hel"}), {"error": {"message": "overloaded"}})
    with pytest.raises(ModelAPIError, match="overloaded"):
        await deltas(model_over([body]))


def test_merge_keeps_order_and_leaves_unusual_chunks_alone():
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "a"}),
        chunk({"content": "b"}),
        chunk({"reasoning_content": "think"}),
        chunk({"reasoning_content": "ing"}),
        chunk({"content": "c"}, logprobs=None),
        {
            **chunk({"content": "d"}),
            "choices": [
                {"index": 0, "delta": {"content": "d"}, "finish_reason": None, "logprobs": {"x": 1}}
            ],
        },
        chunk({"content": "e"}, "stop"),
        chunk({"content": "f"}),
        chunk(None, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
    ]
    merged = merge_chunks(json.loads(json.dumps(chunks)))
    deltas_ = [(c["choices"][0]["delta"] if c["choices"] else None) for c in merged]
    assert deltas_ == [
        {"role": "assistant", "content": "ab"},
        {"reasoning_content": "thinking"},
        {"content": "c"},
        {"content": "d"},  # carries logprobs: kept as it came
        {"content": "e"},
        {"content": "f"},  # after a finish reason: never merged into it
        None,
    ]
    assert merged[4]["choices"][0]["finish_reason"] == "stop"


def test_merge_never_joins_different_tool_calls_or_different_completions():
    def call(index, args, **extra):
        return chunk({"tool_calls": [{"index": index, "function": {"arguments": args}, **extra}]})

    merged = merge_chunks(
        [
            call(0, "{", id="a", type="function"),
            call(0, "}"),
            call(1, "{", id="b", type="function"),
            call(1, "}"),
            {**chunk({"content": "x"}), "id": "other"},
            {**chunk({"content": "y"}), "id": "other2"},
        ]
    )
    args = [
        [
            (t["index"], t["function"]["arguments"])
            for t in c["choices"][0]["delta"].get("tool_calls") or []
        ]
        for c in merged
    ]
    assert args == [[(0, "{}")], [(1, "{}")], [], []]


def test_other_models_are_left_as_they_are():
    from pydantic_ai.models.test import TestModel

    model = TestModel()
    assert batched(model) is model and type(model) is TestModel


def test_configured_openai_compatible_models_read_in_batches(monkeypatch):
    from chat.agent import resolve_model
    from chat.config import Settings

    monkeypatch.setenv("OPENAI_API_KEY", "x")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    model = resolve_model("openai-chat:some-model", Settings.from_env())
    assert isinstance(model, OpenAIChatModel) and model.reads_in_batches
    assert model.model_name == "some-model" and model.base_url.startswith("http://127.0.0.1:9")
