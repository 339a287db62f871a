"""Read an OpenAI-compatible chat stream one network read at a time, not one token at a time.

pydantic-ai turns every `chat.completion.chunk` into a model event and passes it through the
agent's whole event pipeline (parts manager, usage checks, capabilities, the event stream), and
the OpenAI SDK first builds a typed object for it. Per token that was most of this server's CPU.
Tokens that arrive together (in one read from the socket) can go through once: this stream
merges consecutive chunks that only continue the same text, reasoning or tool-call arguments
into one chunk, so under load a reply costs a few dozen events instead of hundreds, and a model
that sends one token per read is streamed exactly as before. Nothing waits to batch: a chunk is
handed on as soon as the read that carried it has been parsed.

Everything else is the SDK's own: its SSE line decoder, its error handling, its typed chunk.
Those are private names of the SDK and of pydantic-ai: import this module only through
chat/openai_fast.py, which falls back to the SDK's own stream when any of them is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from openai import AsyncOpenAI, AsyncStream
from openai._exceptions import APIConnectionError, APIError, APITimeoutError
from openai._httpx2 import request_exceptions, timeout_exceptions
from openai._streaming import SSEDecoder, _SSELineDecoder
from openai.types.chat import ChatCompletionChunk
from pydantic_ai.models.openai import OpenAIChatModel

log = logging.getLogger(__name__)

# Private methods used at request time, checked now: a release without them turns this fast path
# off at start-up (see chat/openai_fast.py) instead of failing a reply.
for _owner, _name in (
    (AsyncOpenAI, "_process_response_data"),
    (OpenAIChatModel, "_process_streamed_response"),
):
    if not callable(getattr(_owner, _name, None)):
        raise AttributeError(f"{_owner.__module__}.{_owner.__qualname__}.{_name} is missing")

# Pieces gathered before the reader lets the reply side take them (see `_raw`).
_MAX_BATCH = 32
# The first hand-over is smaller: the first words are what a reader waits for.
_FIRST_BATCH = 4
# Fields that may differ between chunks of one completion without meaning anything.
_VOLATILE = frozenset({"obfuscation", "created"})
# Delta fields whose text continues from chunk to chunk.
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def _kind(chunk: dict) -> tuple | None:
    """What a chunk carries, if it is a plain continuation that may be merged, else None."""
    if chunk.get("usage") is not None:
        return None
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
        return None
    if any(
        v is not None for k, v in choice.items() if k not in ("index", "delta", "finish_reason")
    ):
        return None  # logprobs, content filter results, ...: keep the chunk as it came
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return None
    fields = tuple(sorted(k for k, v in delta.items() if v is not None and k != "role"))
    if len(fields) != 1:
        return None
    (name,) = fields
    if name in _TEXT_FIELDS:
        return (name,) if isinstance(delta[name], str) else None
    if name == "tool_calls":
        calls = delta["tool_calls"]
        if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], dict):
            return None
        call = calls[0]
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
            return None
        return ("tool_calls", call.get("index"))
    return None


def _continues(call: dict) -> bool:
    """A tool-call delta that only adds argument text (no new id, name or type)."""
    function = call["function"]
    return all(call.get(k) is None for k in ("id", "type")) and all(
        v is None for k, v in function.items() if k != "arguments"
    )


def merge_chunks(chunks: list[dict]) -> list[dict]:
    """Merge runs of chunks that continue the same text or tool-call arguments.

    Order is kept, a chunk with a finish reason ends a run, and anything unusual (usage,
    several choices, logprobs, a new tool call) is passed on unchanged.
    """
    out: list[dict] = []
    last_kind: tuple | None = None
    for chunk in chunks:
        kind = _kind(chunk)
        prev = out[-1] if out else None
        if (
            kind is not None
            and kind == last_kind
            and prev is not None
            and prev["choices"][0].get("finish_reason") is None
            and all(chunk.get(k) == prev.get(k) for k in chunk.keys() - _VOLATILE if k != "choices")
            and (
                kind[0] != "tool_calls" or _continues(chunk["choices"][0]["delta"]["tool_calls"][0])
            )
        ):
            choice, delta = chunk["choices"][0], chunk["choices"][0]["delta"]
            target = prev["choices"][0]
            if kind[0] == "tool_calls":
                fn = target["delta"]["tool_calls"][0]["function"]
                fn["arguments"] += delta["tool_calls"][0]["function"]["arguments"]
            else:
                target["delta"][kind[0]] += delta[kind[0]]
            if choice.get("finish_reason") is not None:
                target["finish_reason"] = choice["finish_reason"]
            continue
        out.append(chunk)
        last_kind = kind
    return out


class BatchedChunkStream(AsyncStream[ChatCompletionChunk]):
    """The SDK's chunk stream, yielding one merged chunk per run of continuations per read."""

    @classmethod
    def wrap(cls, stream: AsyncStream[ChatCompletionChunk]) -> BatchedChunkStream:
        """Take over an SDK stream that has not been iterated yet (same response, same client)."""
        return cls(
            cast_to=ChatCompletionChunk,
            response=stream.response,
            client=stream._client,
            options=stream._options,
        )

    async def __stream__(self) -> AsyncIterator[ChatCompletionChunk]:  # type: ignore[override]
        response = self.response
        process = self._client._process_response_data
        lines, decoder = _SSELineDecoder(), SSEDecoder()
        finished = False
        raws = self._raw()
        try:
            async for raw in raws:
                batch: list[dict] = []
                feed = lines.feed(raw) if raw is not None else lines.finish()
                for line in feed:
                    sse = decoder.decode(line.decode("utf-8"))
                    if sse is None:
                        continue
                    if sse.data.startswith("[DONE]"):
                        finished = True
                        break
                    data = json.loads(sse.data)
                    if isinstance(data, dict) and data.get("error"):
                        error = data["error"]
                        message = error.get("message") if isinstance(error, dict) else None
                        raise APIError(
                            message=message
                            if isinstance(message, str) and message
                            else "An error occurred during streaming",
                            request=response.request,
                            body=error,
                        )
                    batch.append(data)
                for data in merge_chunks(batch):
                    yield process(data=data, cast_to=ChatCompletionChunk, response=response)
                if finished:
                    if response.http_version == "HTTP/1.1":
                        # Read the rest of the body (lets the connection be reused) through the
                        # pump, which is still reading it: a second reader of the same response
                        # fails (anyio's BusyResourceError). llama.cpp's server sends [DONE]
                        # before its body ends, so the pump is often mid-read here.
                        async for _ in raws:
                            pass
                    break
        finally:
            await response.aclose()

    async def _raw(self) -> AsyncIterator[bytes | None]:
        """The response body as it arrives, then None once it has ended.

        The HTTP client yields one piece per chunk of the chunked body, even when a single read
        from the socket brought hundreds. So a task pumps pieces into a list and this side takes
        everything gathered since it last looked: one batch per wait for the network (at most
        `_MAX_BATCH` pieces: then the pump waits until they are taken), never a wait for a
        batch to fill.
        """
        pending: list[bytes] = []
        ready, taken = asyncio.Event(), asyncio.Event()
        ended = handed = False
        failure: BaseException | None = None

        async def pump() -> None:
            nonlocal ended, failure
            try:
                async for raw in self.response.aiter_bytes():
                    pending.append(raw)
                    ready.set()
                    if len(pending) >= (_MAX_BATCH if handed else _FIRST_BATCH):
                        # A whole reply can sit in one socket read: hand over part of it, so
                        # the first words show without waiting for the last, and read on when
                        # it has been taken (the rest waits in the socket meanwhile).
                        taken.clear()
                        await taken.wait()
            except Exception as exc:  # handed to the reading side, which raises it
                failure = exc
            finally:
                ended = True
                ready.set()

        task = asyncio.create_task(pump(), name="model-stream-reader")
        try:
            while True:
                if not pending and not ended:
                    await ready.wait()
                ready.clear()
                if pending:
                    raw = b"".join(pending)
                    pending.clear()
                    handed = True
                    taken.set()
                    yield raw
                elif ended:
                    break
            if failure is not None:
                if isinstance(failure, timeout_exceptions()):
                    raise APITimeoutError(request=self.response.request) from failure
                if isinstance(failure, request_exceptions()):
                    raise APIConnectionError(request=self.response.request) from failure
                raise failure
            yield None
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


_BATCHED: dict[type, type] = {}
_wrap_failed = False


def _wrap_or_keep(stream: AsyncStream[ChatCompletionChunk]) -> AsyncStream[ChatCompletionChunk]:
    """The batched stream, or the SDK's own if this release's stream cannot be taken over."""
    global _wrap_failed
    if _wrap_failed:
        return stream
    try:
        return BatchedChunkStream.wrap(stream)
    except (AttributeError, TypeError) as exc:
        _wrap_failed = True
        log.warning("OpenAI stream reads: the SDK's own stream is used instead (%s)", exc)
        return stream


def _batched_class(cls: type) -> type:
    """A subclass of an OpenAI chat model class whose streams read a batch per network read."""

    async def _process_streamed_response(self, response: Any, *args: Any, **kwargs: Any):
        if type(response) is AsyncStream:  # anything else (a test double, a subclass) as it is
            response = _wrap_or_keep(response)
        return await super(sub, self)._process_streamed_response(response, *args, **kwargs)

    # A plain subclass with no state of its own, so an existing model's class can be swapped.
    sub = type(
        f"Batched{cls.__name__}",
        (cls,),
        {
            "_process_streamed_response": _process_streamed_response,
            "reads_in_batches": True,
            "__module__": __name__,
        },
    )
    return sub


def batched(model: Any) -> Any:
    """Make an OpenAI chat model read its streams in batches; other models are returned as is."""
    cls = type(model)
    if not isinstance(model, OpenAIChatModel) or getattr(model, "reads_in_batches", False):
        return model
    if cls not in _BATCHED:
        _BATCHED[cls] = _batched_class(cls)
    model.__class__ = _BATCHED[cls]
    return model
