"""The Agent: instructions, model choice and the built-in offline demo model."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    UserPromptPart,
)
from pydantic_ai.models import Model, infer_model
from pydantic_ai.models.function import AgentInfo, FunctionModel

from chat.config import Settings

INSTRUCTIONS = (
    "You are a helpful assistant in a web chat. Answer clearly and use Markdown "
    "(headings, lists, fenced code blocks with a language) where it helps the reader."
)
DEMO_NAME = "demo"


def build_agent() -> Agent:
    """The app's agent. The model is chosen per run, so one agent serves every model."""
    return Agent(instructions=INSTRUCTIONS, name="chat")


class ModelUnavailable(Exception):
    """A configured model cannot be started (unknown name, missing package or key)."""


def resolve_model(name: str | None, settings: Settings) -> Model:
    """Turn a model string into a pydantic-ai Model; None or 'demo' gives the demo model."""
    if not name or name == DEMO_NAME:
        return demo_model(settings)
    try:
        return infer_model(name)
    except Exception as exc:  # unknown provider, missing SDK or key: all are config errors
        raise ModelUnavailable(f"The model {name!r} could not be started: {exc}") from exc


def _prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for m in messages
        if isinstance(m, ModelRequest)
        for part in m.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


def demo_reply(messages: list[ModelMessage], settings: Settings) -> str:
    """What the demo model says: how to configure a real model, and an echo of the input."""
    prompts = _prompts(messages)
    latest = prompts[-1] if prompts else ""
    quoted = "\n".join("> " + line for line in latest.splitlines()) or "> (empty)"
    earlier = len(prompts) - 1
    keys = ", ".join(f"`{k}`" for k in settings.provider_keys)
    key_note = (
        f"I can see {keys} in the environment, so only `MODEL` is missing."
        if keys
        else "No provider API key is set either."
    )
    return f"""**This is the offline demo model.** No `MODEL` is configured, so replies come \
from a small built-in script instead of a language model. {key_note}

You wrote:

{quoted}

This conversation has **{earlier}** earlier message{"" if earlier == 1 else "s"} in the \
history sent to the model.

### Use a real model

1. Pick any model pydantic-ai supports and set `MODEL`, with the provider's key:

```bash
MODEL=openai-chat:gpt-4o-mini OPENAI_API_KEY=sk-... uv run main.py
```

2. Or run a local model through an OpenAI-compatible server such as Ollama or vLLM:

```bash
OPENAI_BASE_URL=http://localhost:11434/v1 OPENAI_API_KEY=ollama \\
MODEL=openai-chat:llama3.2 uv run main.py
```

Conversations are kept in SQLite, so everything here stays when you switch models."""


def demo_model(settings: Settings, *, delay: float = 0.012) -> FunctionModel:
    """An offline model that streams `demo_reply` a few characters at a time."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for piece in re.findall(r"\s*\S+", demo_reply(messages, settings)):
            yield piece
            await asyncio.sleep(delay)

    return FunctionModel(stream_function=stream, model_name=DEMO_NAME)


TITLE_INSTRUCTIONS = (
    "Write a short title (at most six words) for the conversation below. "
    "Answer with the title only: no quotes, no punctuation at the end."
)


def short_title(text: str, limit: int = 60) -> str:
    """A title from text: its first line, whitespace folded, cut at a word."""
    words = " ".join(text.split())
    if len(words) <= limit:
        return words
    return words[:limit].rsplit(" ", 1)[0] + "…"


async def make_title(model: Model, user_text: str, reply_text: str) -> str:
    """Ask the model for a title for the first exchange; the demo model just shortens the prompt."""
    if model.model_name == DEMO_NAME:
        return short_title(user_text)
    agent = Agent(instructions=TITLE_INSTRUCTIONS, name="titler")
    prompt = f"User: {user_text[:2000]}\n\nAssistant: {reply_text[:2000]}"
    text = ""
    async with agent.run_stream_events(prompt, model=model) as events:
        async for event in events:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                text += event.part.content
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                text += event.delta.content_delta
    title = short_title(text.strip().strip("\"'“”").rstrip("."), 80)
    return title or short_title(user_text)
