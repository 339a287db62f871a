"""What a finished run leaves behind: its messages made storable, its text and its usage."""

from __future__ import annotations

import time

from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse
from pydantic_ai.usage import RunUsage

from chat.store import dump_messages, load_messages


def salvage(events, fallback: list[ModelMessage]) -> list[ModelMessage]:
    """The messages a failed run produced, if it got far enough to have any."""
    if events is None:
        return fallback
    try:
        return events.new_messages() or fallback
    except Exception:
        return fallback


def valid_text(text: str) -> bool:
    """False for text that cannot be encoded as UTF-8 (lone surrogates): unstorable, unshowable."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def clean(text: str) -> str:
    """`text` with anything UTF-8 cannot encode replaced by U+FFFD."""
    return (
        text
        if valid_text(text)
        else text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    )


def storable(messages: list[ModelMessage]) -> list[ModelMessage]:
    """`messages`, with every string made encodable, so a hostile reply can still be saved."""
    try:
        dump_messages(messages)
        return messages
    except ValueError:  # e.g. a lone surrogate in text or tool arguments
        raw = dump_messages_lossy(messages)
        return load_messages(raw)


def dump_messages_lossy(messages: list[ModelMessage]) -> str:
    """Serialize messages, replacing what UTF-8 cannot encode instead of failing."""
    data = ModelMessagesTypeAdapter.dump_python(list(messages), mode="python")
    return ModelMessagesTypeAdapter.dump_json(
        ModelMessagesTypeAdapter.validate_python(_scrub(data))
    ).decode()


def _scrub(value):
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def text_of(messages: list[ModelMessage]) -> str:
    """The reply text in `messages` (for replies whose text was never streamed)."""
    return "\n\n".join(t for m in messages if isinstance(m, ModelResponse) and (t := m.text))


def has_text(messages: list[ModelMessage]) -> bool:
    """True if any response in `messages` holds text."""
    return any(isinstance(m, ModelResponse) and m.text for m in messages)


def usage_of(usage: RunUsage, started: float, first: float | None) -> dict:
    """Token counts from the provider, and timing measured here.

    Some servers (llama.cpp's, several local ones) send no usage in a stream; pydantic-ai then
    counts zero of both. A reply always has a prompt, so that is "not reported" (None), never a
    real zero to show or to add to a total.
    """
    end = time.monotonic()
    streaming = end - first if first else 0.0
    reported = bool(usage.input_tokens or usage.output_tokens)
    output = usage.output_tokens if reported else None
    return {
        "input_tokens": usage.input_tokens if reported else None,
        "output_tokens": output,
        "requests": usage.requests,
        "tool_calls": usage.tool_calls,
        "seconds": round(end - started, 3),
        "first_token_seconds": round(first - started, 3) if first else None,
        "tokens_per_second": round(output / streaming, 1) if output and streaming > 0 else None,
    }
